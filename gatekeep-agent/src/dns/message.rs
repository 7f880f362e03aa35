//! DNS messages a workload sent or received, parsed with `hickory-proto`:
//! the question, and for an answer the addresses it gives the question
//! name (following CNAME chains within the answer) with their TTLs.

use std::net::IpAddr;

use hickory_proto::{
    op::{Message, MessageType, ResponseCode},
    rr::{Name, RData},
};

/// Most CNAME links followed in one answer.
const MAX_CHAIN: usize = 8;

/// A parsed DNS message: its id, question name and (answers) addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub id: u16,
    /// The question name, lower case, without the final dot.
    pub name: String,
    pub response: bool,
    /// (address, TTL in seconds): the A/AAAA records of the question name
    /// or of the names a CNAME chain from it leads to, each with the
    /// smallest TTL along its chain. Empty for a query, an error or NODATA.
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Why a message teaches nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("not a DNS message: {reason}")]
    Malformed { reason: String },
    #[error("a DNS message with {count} questions (one expected)")]
    Questions { count: usize },
}

/// Parses a UDP payload.
pub fn parse(payload: &[u8]) -> Result<Parsed, MessageError> {
    let message = Message::from_vec(payload).map_err(|err| MessageError::Malformed {
        reason: err.to_string(),
    })?;
    if message.queries.len() != 1 {
        return Err(MessageError::Questions {
            count: message.queries.len(),
        });
    }
    let question = message.queries[0].name();
    let response = message.metadata.message_type == MessageType::Response;
    let mut addresses = Vec::new();
    if response && message.metadata.response_code == ResponseCode::NoError {
        addresses = chain_addresses(&message, question);
    }
    Ok(Parsed {
        id: message.metadata.id,
        name: name_text(question),
        response,
        addresses,
    })
}

/// The addresses `question` stands for in the answer section.
fn chain_addresses(message: &Message, question: &Name) -> Vec<(IpAddr, u32)> {
    // (name, smallest TTL of the CNAMEs that led to it).
    let mut chain: Vec<(Name, u32)> = vec![(question.to_lowercase(), u32::MAX)];
    let mut i = 0;
    while i < chain.len() && chain.len() <= MAX_CHAIN {
        let (name, ttl) = chain[i].clone();
        for record in &message.answers {
            if record.name.to_lowercase() != name {
                continue;
            }
            if let RData::CNAME(target) = &record.data {
                let target = target.0.to_lowercase();
                if !chain.iter().any(|(seen, _)| *seen == target) {
                    chain.push((target, ttl.min(record.ttl)));
                }
            }
        }
        i += 1;
    }
    let mut addresses = Vec::new();
    for record in &message.answers {
        let owner = record.name.to_lowercase();
        let Some((_, chain_ttl)) = chain.iter().find(|(name, _)| *name == owner) else {
            continue;
        };
        let addr = match &record.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(aaaa) => IpAddr::V6(aaaa.0),
            _ => continue,
        };
        addresses.push((addr, record.ttl.min(*chain_ttl)));
    }
    addresses
}

/// A name as rules compare it: lower case, no final dot.
fn name_text(name: &Name) -> String {
    gatekeep_policy::normalize_host(&name.to_lowercase().to_ascii())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::{
        op::{Message, MessageType, OpCode, Query},
        rr::{
            Name, RData, Record, RecordType,
            rdata::{A, AAAA, CNAME},
        },
    };

    use super::*;

    /// The bytes of a real answer (as a resolver writes it) for `question`.
    pub(crate) fn answer(id: u16, question: &str, records: Vec<Record>) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Response, OpCode::Query);
        message.add_query(Query::query(
            Name::from_ascii(question).expect("name"),
            RecordType::A,
        ));
        message.add_answers(records);
        message.to_vec().expect("encodes")
    }

    pub(crate) fn query(id: u16, question: &str) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.add_query(Query::query(
            Name::from_ascii(question).expect("name"),
            RecordType::A,
        ));
        message.to_vec().expect("encodes")
    }

    pub(crate) fn a(name: &str, ttl: u32, addr: [u8; 4]) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).expect("name"),
            ttl,
            RData::A(A(Ipv4Addr::from(addr))),
        )
    }

    fn cname(name: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(
            Name::from_ascii(name).expect("name"),
            ttl,
            RData::CNAME(CNAME(Name::from_ascii(target).expect("name"))),
        )
    }

    #[test]
    fn a_query_has_its_id_and_lower_case_name() {
        let parsed = parse(&query(7, "API.Allowed.Test.")).unwrap();
        assert_eq!(
            parsed,
            Parsed {
                id: 7,
                name: "api.allowed.test".into(),
                response: false,
                addresses: Vec::new(),
            }
        );
    }

    #[test]
    fn cname_chains_lead_to_the_addresses_with_the_smallest_ttl() {
        let bytes = answer(
            9,
            "www.example.test.",
            vec![
                cname("www.example.test.", 30, "edge.cdn.test."),
                cname("EDGE.cdn.test.", 300, "e1.cdn.test."),
                a("e1.cdn.test.", 60, [192, 0, 2, 1]),
                a("e1.cdn.test.", 10, [192, 0, 2, 2]),
                // Not on the chain: an answer may not vouch for other names.
                a("evil.test.", 600, [203, 0, 113, 9]),
                Record::from_rdata(
                    Name::from_ascii("www.example.test.").unwrap(),
                    120,
                    RData::AAAA(AAAA(Ipv6Addr::LOCALHOST)),
                ),
            ],
        );
        let parsed = parse(&bytes).unwrap();
        assert_eq!(parsed.name, "www.example.test");
        assert!(parsed.response);
        assert_eq!(
            parsed.addresses,
            vec![
                (IpAddr::from([192, 0, 2, 1]), 30),
                (IpAddr::from([192, 0, 2, 2]), 10),
                (IpAddr::V6(Ipv6Addr::LOCALHOST), 120),
            ]
        );
    }

    #[test]
    fn garbage_and_error_answers_teach_nothing() {
        assert!(matches!(
            parse(&[0u8; 5]),
            Err(MessageError::Malformed { .. })
        ));
        let mut message = Message::new(3, MessageType::Response, OpCode::Query);
        message.metadata.response_code = ResponseCode::NXDomain;
        message.add_query(Query::query(
            Name::from_ascii("x.test.").unwrap(),
            RecordType::A,
        ));
        message.add_answer(a("x.test.", 60, [192, 0, 2, 1]));
        let parsed = parse(&message.to_vec().unwrap()).unwrap();
        assert!(parsed.addresses.is_empty());
    }
}
