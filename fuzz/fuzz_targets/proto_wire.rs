//! gRPC wire to domain: the first byte picks a message, the rest is its protobuf encoding.
//! Decoding and the checked conversion (`gatekeep_proto::convert`) give a domain value or
//! an error, never a panic; a value that converted goes back to the wire and converts again
//! to the same value (nothing is lost or invented on the way).
#![no_main]

use gatekeep_proto::{model, v1};
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// Decodes `bytes` as the wire message `W`, converts it to the domain type `D`, and checks
/// that `D` survives a round trip through the wire.
fn round_trip<W, D>(bytes: &[u8])
where
    W: Message + Default,
    D: TryFrom<W> + Into<W> + Clone + PartialEq + std::fmt::Debug,
    <D as TryFrom<W>>::Error: std::fmt::Display,
{
    let Ok(wire) = W::decode(bytes) else {
        return;
    };
    let domain = match D::try_from(wire) {
        Ok(domain) => domain,
        Err(err) => {
            assert!(!err.to_string().is_empty());
            return;
        }
    };
    let wire: W = domain.clone().into();
    let encoded = wire.encode_to_vec();
    let decoded = W::decode(encoded.as_slice()).expect("our own encoding decodes");
    match D::try_from(decoded) {
        Ok(again) => assert_eq!(again, domain, "a domain value changed through the wire"),
        Err(err) => panic!("a converted value no longer converts: {err}: {domain:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 9 {
        0 => round_trip::<v1::ExecTarget, model::ExecTarget>(bytes),
        1 => round_trip::<v1::ConnectTarget, model::ConnectTarget>(bytes),
        2 => round_trip::<v1::Process, model::ProcessInfo>(bytes),
        3 => round_trip::<v1::ApprovalSettings, model::ApprovalSettings>(bytes),
        4 => round_trip::<v1::ApprovalRequest, model::ApprovalRequest>(bytes),
        5 => round_trip::<v1::Grant, model::Grant>(bytes),
        6 => round_trip::<v1::Decision, model::Decision>(bytes),
        7 => round_trip::<v1::Vote, model::Vote>(bytes),
        _ => round_trip::<v1::RequestRecord, model::RequestRecord>(bytes),
    }
});
