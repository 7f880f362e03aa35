//! Parsing of connect rule targets: `CIDR[:PORTS]`.
//!
//! Accepted forms:
//! - IPv4: `10.0.0.0/8`, `10.1.0.0/16:443`, `10.2.0.0/16:8000-8999`, and a bare
//!   address `192.0.2.7` or `192.0.2.7:53` meaning `/32`;
//! - IPv6 in brackets: `[::1]/128`, `[2001:db8::]/32:443`, `[::1]` (= `/128`),
//!   `[::1]:53`;
//! - IPv6 without brackets when no port follows: `::1/128`, `2001:db8::/32`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::model::{PortRange, format_target};

/// Why a connect target was refused; `Display` is the diagnostic message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TargetError {
    #[error(
        "empty connect target (expected a network such as 10.0.0.0/8, 10.1.0.0/16:443 or [2001:db8::]/32:443)"
    )]
    Empty,
    #[error(
        "\"{target}\" is not an IP network; connect rules match IP addresses, not host names (e.g. 192.0.2.0/24:443)"
    )]
    HostName { target: String },
    #[error(
        "invalid address \"{address}\" in \"{target}\" (expected an IPv4 or IPv6 address, e.g. 10.0.0.0/8 or [2001:db8::]/32:443)"
    )]
    Address { target: String, address: String },
    #[error(
        "\"{target}\" is not a valid IPv6 network; write IPv6 in brackets with the port after them, e.g. [2001:db8::]/32:443"
    )]
    Ipv6Form { target: String },
    #[error("missing \"]\" in \"{target}\"; write IPv6 as [2001:db8::]/32:443")]
    Unclosed { target: String },
    #[error(
        "unexpected \"{rest}\" after \"]\" in \"{target}\" (expected /prefix, :port or nothing)"
    )]
    AfterBracket { target: String, rest: String },
    #[error(
        "IPv4 address \"{address}\" in brackets; write IPv4 without brackets, e.g. {address}:443"
    )]
    BracketedV4 { address: String },
    #[error("invalid prefix length \"/{prefix}\" in \"{target}\" (expected a number, e.g. /24)")]
    Prefix { target: String, prefix: String },
    #[error("prefix length /{prefix} in \"{target}\" is too long for {family} (at most /{max})")]
    PrefixTooLong {
        target: String,
        prefix: u32,
        family: &'static str,
        max: u8,
    },
    #[error("{target} has host bits set; did you mean {normalized}?")]
    HostBits { target: String, normalized: String },
    #[error("missing port after \":\" in \"{target}\" (expected e.g. :443 or :8000-8999)")]
    NoPort { target: String },
    #[error(
        "invalid port \"{port}\" in \"{target}\" (expected a port such as 443 or a range such as 8000-8999)"
    )]
    Port { target: String, port: String },
    #[error(
        "port 0 in \"{target}\" is not a destination port (ports are 1-65535; leave the port out to match all)"
    )]
    PortZero { target: String },
    #[error("port {port} in \"{target}\" is out of range (ports are 1-65535)")]
    PortTooLarge { target: String, port: String },
    #[error("port range {lo}-{hi} in \"{target}\" is reversed; did you mean {hi}-{lo}?")]
    Reversed { target: String, lo: u16, hi: u16 },
}

/// Parses one connect target into a normalised network and a port range.
pub(crate) fn parse_target(target: &str) -> Result<(IpNet, PortRange), TargetError> {
    let text = target.trim();
    if text.is_empty() {
        return Err(TargetError::Empty);
    }
    let (address, prefix, ports) = split(text)?;
    let net = make_net(text, address, prefix)?;
    let ports = match ports {
        None => PortRange::ALL,
        Some(ports) => parse_ports(text, ports)?,
    };
    let normal = net.trunc();
    if normal != net {
        return Err(TargetError::HostBits {
            target: text.to_owned(),
            normalized: format_target(normal, ports),
        });
    }
    Ok((net, ports))
}

/// Splits a target into address, optional prefix text and optional port text.
fn split(text: &str) -> Result<(IpAddr, Option<&str>, Option<&str>), TargetError> {
    if let Some(inner) = text.strip_prefix('[') {
        let Some((address, rest)) = inner.split_once(']') else {
            return Err(TargetError::Unclosed {
                target: text.to_owned(),
            });
        };
        let address = parse_v6_in_brackets(text, address)?;
        let (prefix, ports) = if rest.is_empty() {
            (None, None)
        } else if let Some(after) = rest.strip_prefix('/') {
            match after.split_once(':') {
                Some((prefix, ports)) => (Some(prefix), Some(ports)),
                None => (Some(after), None),
            }
        } else if let Some(ports) = rest.strip_prefix(':') {
            (None, Some(ports))
        } else {
            return Err(TargetError::AfterBracket {
                target: text.to_owned(),
                rest: rest.to_owned(),
            });
        };
        return Ok((IpAddr::V6(address), prefix, ports));
    }

    // IPv4 contains no ':', so the first ':' separates the ports.
    let (net_text, ports) = match text.split_once(':') {
        Some((left, ports)) => (left, Some(ports)),
        None => (text, None),
    };
    let (address, prefix) = match net_text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (net_text, None),
    };
    if let Ok(v4) = address.parse::<Ipv4Addr>() {
        return Ok((IpAddr::V4(v4), prefix, ports));
    }
    if text.matches(':').count() >= 2 {
        // IPv6 without brackets, which cannot carry a port.
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        return match address.parse::<Ipv6Addr>() {
            Ok(v6) if prefix.is_none_or(|p| p.chars().all(|c| c.is_ascii_digit())) => {
                Ok((IpAddr::V6(v6), prefix, None))
            }
            _ => Err(TargetError::Ipv6Form {
                target: text.to_owned(),
            }),
        };
    }
    if address.chars().any(|c| c.is_ascii_alphabetic()) {
        return Err(TargetError::HostName {
            target: text.to_owned(),
        });
    }
    Err(TargetError::Address {
        target: text.to_owned(),
        address: address.to_owned(),
    })
}

fn parse_v6_in_brackets(text: &str, address: &str) -> Result<Ipv6Addr, TargetError> {
    if let Ok(v6) = address.parse::<Ipv6Addr>() {
        return Ok(v6);
    }
    if address.parse::<Ipv4Addr>().is_ok() {
        return Err(TargetError::BracketedV4 {
            address: address.to_owned(),
        });
    }
    Err(TargetError::Address {
        target: text.to_owned(),
        address: address.to_owned(),
    })
}

fn make_net(text: &str, address: IpAddr, prefix: Option<&str>) -> Result<IpNet, TargetError> {
    let (family, max) = match address {
        IpAddr::V4(_) => ("IPv4", 32),
        IpAddr::V6(_) => ("IPv6", 128),
    };
    let len = match prefix {
        None => max,
        Some(prefix) => {
            if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_digit()) {
                return Err(TargetError::Prefix {
                    target: text.to_owned(),
                    prefix: prefix.to_owned(),
                });
            }
            match prefix.parse::<u32>() {
                Ok(len) if len <= u32::from(max) => {
                    u8::try_from(len).map_err(|_| TargetError::Prefix {
                        target: text.to_owned(),
                        prefix: prefix.to_owned(),
                    })?
                }
                Ok(len) => {
                    return Err(TargetError::PrefixTooLong {
                        target: text.to_owned(),
                        prefix: len,
                        family,
                        max,
                    });
                }
                Err(_) => {
                    return Err(TargetError::PrefixTooLong {
                        target: text.to_owned(),
                        prefix: u32::MAX,
                        family,
                        max,
                    });
                }
            }
        }
    };
    IpNet::new(address, len).map_err(|_| TargetError::Prefix {
        target: text.to_owned(),
        prefix: len.to_string(),
    })
}

pub(crate) fn parse_ports(text: &str, ports: &str) -> Result<PortRange, TargetError> {
    if ports.is_empty() {
        return Err(TargetError::NoPort {
            target: text.to_owned(),
        });
    }
    let (lo, hi) = if let Some((lo, hi)) = ports.split_once('-') {
        (parse_port(text, lo)?, parse_port(text, hi)?)
    } else {
        let port = parse_port(text, ports)?;
        (port, port)
    };
    if lo > hi {
        return Err(TargetError::Reversed {
            target: text.to_owned(),
            lo,
            hi,
        });
    }
    Ok(PortRange(lo, hi))
}

fn parse_port(text: &str, port: &str) -> Result<u16, TargetError> {
    if port.is_empty() || !port.chars().all(|c| c.is_ascii_digit()) {
        return Err(TargetError::Port {
            target: text.to_owned(),
            port: port.to_owned(),
        });
    }
    match port.parse::<u16>() {
        Ok(0) => Err(TargetError::PortZero {
            target: text.to_owned(),
        }),
        Ok(port) => Ok(port),
        Err(_) => Err(TargetError::PortTooLarge {
            target: text.to_owned(),
            port: port.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(target: &str) -> (String, PortRange) {
        let (net, ports) = parse_target(target).unwrap_or_else(|e| panic!("{target}: {e}"));
        (net.to_string(), ports)
    }

    fn err(target: &str) -> String {
        match parse_target(target) {
            Ok(parsed) => panic!("{target} parsed as {parsed:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn ipv4_forms() {
        assert_eq!(
            ok("127.0.0.0/8"),
            ("127.0.0.0/8".to_owned(), PortRange::ALL)
        );
        assert_eq!(
            ok("10.1.0.0/16:443"),
            ("10.1.0.0/16".to_owned(), PortRange(443, 443))
        );
        assert_eq!(
            ok("10.2.0.0/16:8000-8999"),
            ("10.2.0.0/16".to_owned(), PortRange(8000, 8999))
        );
        assert_eq!(ok("0.0.0.0/0"), ("0.0.0.0/0".to_owned(), PortRange::ALL));
        assert_eq!(
            ok("192.0.2.7:65535"),
            ("192.0.2.7/32".to_owned(), PortRange(65535, 65535))
        );
    }

    #[test]
    fn bare_addresses_are_host_routes() {
        assert_eq!(ok("192.0.2.7"), ("192.0.2.7/32".to_owned(), PortRange::ALL));
        assert_eq!(
            ok("192.0.2.7:53"),
            ("192.0.2.7/32".to_owned(), PortRange(53, 53))
        );
        assert_eq!(ok("[::1]"), ("::1/128".to_owned(), PortRange::ALL));
        assert_eq!(ok("[::1]:53"), ("::1/128".to_owned(), PortRange(53, 53)));
        assert_eq!(ok("::1"), ("::1/128".to_owned(), PortRange::ALL));
    }

    #[test]
    fn ipv6_forms() {
        assert_eq!(ok("[::1]/128"), ("::1/128".to_owned(), PortRange::ALL));
        assert_eq!(
            ok("[2001:db8::]/32:443"),
            ("2001:db8::/32".to_owned(), PortRange(443, 443))
        );
        assert_eq!(
            ok("[2001:db8::]/32:8000-8999"),
            ("2001:db8::/32".to_owned(), PortRange(8000, 8999))
        );
        assert_eq!(
            ok("2001:db8::/32"),
            ("2001:db8::/32".to_owned(), PortRange::ALL)
        );
        assert_eq!(ok("[::]/0"), ("::/0".to_owned(), PortRange::ALL));
        assert_eq!(
            ok("::ffff:10.0.0.0/104"),
            ("::ffff:10.0.0.0/104".to_owned(), PortRange::ALL)
        );
    }

    #[test]
    fn host_bits_suggest_the_network() {
        assert_eq!(
            err("10.1.2.3/16"),
            "10.1.2.3/16 has host bits set; did you mean 10.1.0.0/16?"
        );
        assert_eq!(
            err("10.1.2.3/16:443"),
            "10.1.2.3/16:443 has host bits set; did you mean 10.1.0.0/16:443?"
        );
        assert_eq!(
            err("[2001:db8::1]/32:443"),
            "[2001:db8::1]/32:443 has host bits set; did you mean [2001:db8::]/32:443?"
        );
    }

    #[test]
    fn bad_ports() {
        assert_eq!(
            err("10.0.0.0/8:0"),
            "port 0 in \"10.0.0.0/8:0\" is not a destination port (ports are 1-65535; leave the port out to match all)"
        );
        assert_eq!(
            err("10.0.0.0/8:65536"),
            "port 65536 in \"10.0.0.0/8:65536\" is out of range (ports are 1-65535)"
        );
        assert_eq!(
            err("10.0.0.0/8:9000-8000"),
            "port range 9000-8000 in \"10.0.0.0/8:9000-8000\" is reversed; did you mean 8000-9000?"
        );
        assert_eq!(
            err("10.0.0.0/8:http"),
            "invalid port \"http\" in \"10.0.0.0/8:http\" (expected a port such as 443 or a range such as 8000-8999)"
        );
        assert_eq!(
            err("10.0.0.0/8:"),
            "missing port after \":\" in \"10.0.0.0/8:\" (expected e.g. :443 or :8000-8999)"
        );
        assert_eq!(
            err("10.0.0.0/8:0-80"),
            "port 0 in \"10.0.0.0/8:0-80\" is not a destination port (ports are 1-65535; leave the port out to match all)"
        );
    }

    #[test]
    fn bad_networks() {
        assert_eq!(
            err("10.0.0.0/33"),
            "prefix length /33 in \"10.0.0.0/33\" is too long for IPv4 (at most /32)"
        );
        assert_eq!(
            err("[::]/129"),
            "prefix length /129 in \"[::]/129\" is too long for IPv6 (at most /128)"
        );
        assert_eq!(
            err("10.0.0.0/x"),
            "invalid prefix length \"/x\" in \"10.0.0.0/x\" (expected a number, e.g. /24)"
        );
        assert_eq!(
            err("10.1.2/24"),
            "invalid address \"10.1.2\" in \"10.1.2/24\" (expected an IPv4 or IPv6 address, e.g. 10.0.0.0/8 or [2001:db8::]/32:443)"
        );
        assert_eq!(
            err("example.com:443"),
            "\"example.com:443\" is not an IP network; connect rules match IP addresses, not host names (e.g. 192.0.2.0/24:443)"
        );
        assert_eq!(
            err("2001:db8::/32:443"),
            "\"2001:db8::/32:443\" is not a valid IPv6 network; write IPv6 in brackets with the port after them, e.g. [2001:db8::]/32:443"
        );
        assert_eq!(
            err("[::1/128"),
            "missing \"]\" in \"[::1/128\"; write IPv6 as [2001:db8::]/32:443"
        );
        assert_eq!(
            err("[10.0.0.1]:80"),
            "IPv4 address \"10.0.0.1\" in brackets; write IPv4 without brackets, e.g. 10.0.0.1:443"
        );
        assert_eq!(
            err("[::1]x"),
            "unexpected \"x\" after \"]\" in \"[::1]x\" (expected /prefix, :port or nothing)"
        );
        assert!(err("").starts_with("empty connect target"));
    }
}
