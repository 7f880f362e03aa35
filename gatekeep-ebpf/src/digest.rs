//! Keyed request digests (SipHash-1-3 over 64-bit words).
//!
//! A verdict is bound to the digest of what was asked; the key is random
//! per load so a workload cannot craft a different request that collides
//! with an approved one.

use gatekeep_common::SipHash13;

use crate::maps::digest_key;

/// Incremental SipHash-1-3 state, keyed with this load's key.
pub struct Digest(SipHash13);

impl Digest {
    #[inline(always)]
    pub fn new() -> Self {
        Self(SipHash13::new(digest_key()))
    }

    #[inline(always)]
    pub fn word(&mut self, m: u64) {
        self.0.word(m);
    }

    /// Hashes the whole 64-byte blocks of `bytes` that hold its first `len`
    /// bytes (at most `max` bytes, a multiple of 64): the caller zeroes the
    /// rest of the last block. The loop's only branch is its exit, so the
    /// verifier walks each block once, and a short input costs one or two
    /// blocks instead of the whole window.
    ///
    /// # Safety
    ///
    /// `bytes` is valid for `max` bytes.
    #[inline(always)]
    pub unsafe fn blocks(&mut self, bytes: *const u8, len: usize, max: usize) {
        const BLOCK: usize = 64;
        let words = bytes.cast::<u64>();
        let used_blocks = len.div_ceil(BLOCK);
        let mut block = 0;
        while block < max / BLOCK {
            if block >= used_blocks {
                break;
            }
            let mut i = 0;
            while i < BLOCK / 8 {
                // SAFETY: (caller) inside the first `max` bytes.
                self.word(unsafe { words.add(block * (BLOCK / 8) + i).read_unaligned() });
                i += 1;
            }
            block += 1;
        }
    }

    #[inline(always)]
    pub fn finish(self) -> u64 {
        self.0.finish()
    }
}
