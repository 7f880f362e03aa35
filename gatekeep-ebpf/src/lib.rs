//! Empty on purpose: the programs are in the `gatekeep` binary target
//! (`main.rs`). This library lets `gatekeep-agent` depend on the crate so
//! cargo rebuilds the agent's embedded object when the programs change.
#![no_std]
