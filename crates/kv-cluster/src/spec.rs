//! The cluster spec: which node this is, how many shards and replicas, and
//! the members by id (design §3, §8).
//!
//! Every process computes placement from the same spec, so a spec is either
//! valid as a whole or refused with the part that is wrong named: a node
//! started with a typo in `--peers` must say which entry, not "invalid".

use std::collections::BTreeMap;
use std::num::ParseIntError;

use crate::shard::MAX_SHARDS;

/// Shards when `--shards` is not given (design §1).
pub const DEFAULT_SHARDS: u32 = 64;
/// Replicas per shard when `--replicas` is not given.
pub const DEFAULT_REPLICAS: u32 = 3;

/// What every node of a cluster agrees on, plus which member this process is.
///
/// Build it with [`ClusterSpec::new`], which validates; the fields are public
/// for reading, and [`ClusterSpec::validate`] re-checks a spec built by hand
/// (or read back from disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// This node's member id (`--node-id`).
    pub node_id: u64,
    /// Number of shards, fixed when the cluster is created (`--shards`).
    pub shards: u32,
    /// Copies of each shard (`--replicas`).
    pub replicas: u32,
    /// Member id → address (`host:port`) clients and peers reach it at.
    pub members: BTreeMap<u64, String>,
}

/// Why a `--peers` list could not be parsed. Every variant names the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeersError {
    /// Nothing but whitespace and commas.
    #[error("--peers is empty; give it as ID=HOST:PORT,... (for example 1=127.0.0.1:8081,2=127.0.0.1:8082)")]
    Empty,
    /// `a,,b` or a trailing comma.
    #[error("--peers entry {position} is empty (a doubled or trailing comma?)")]
    EmptyEntry {
        /// 1-based position in the list.
        position: usize,
    },
    /// An entry without `=`.
    #[error("--peers entry {entry:?} has no '='; write it as ID=HOST:PORT, for example 1=127.0.0.1:8081")]
    MissingEquals {
        /// The entry as given.
        entry: String,
    },
    /// The part before `=` is not an unsigned integer.
    #[error("--peers entry {entry:?}: node id {id:?} is not a non-negative integer")]
    BadId {
        /// The entry as given.
        entry: String,
        /// The id part.
        id: String,
        /// Why it did not parse.
        #[source]
        source: ParseIntError,
    },
    /// The part after `=` is not `host:port`.
    #[error("--peers entry {entry:?}: address {addr:?} {reason}")]
    BadAddr {
        /// The entry as given.
        entry: String,
        /// The address part.
        addr: String,
        /// What is wrong with it.
        reason: AddrProblem,
    },
    /// The same id twice.
    #[error("--peers names node {id} twice ({first} and {second}); every node needs its own id")]
    DuplicateId {
        /// The repeated id.
        id: u64,
        /// Its first address.
        first: String,
        /// Its second address.
        second: String,
    },
    /// The same address under two ids.
    #[error("--peers gives address {addr} to both node {first} and node {second}; every node needs its own address")]
    DuplicateAddr {
        /// The repeated address.
        addr: String,
        /// The first id it was given to.
        first: u64,
        /// The second.
        second: u64,
    },
}

/// What is wrong with an address (part of [`PeersError::BadAddr`]).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum AddrProblem {
    /// No `:port`.
    #[error("has no ':PORT'")]
    NoPort,
    /// Nothing before the `:`.
    #[error("has no host before ':'")]
    NoHost,
    /// The port is not 1..=65535.
    #[error("has a port that is not a number in 1..=65535")]
    BadPort,
    /// Whitespace, `/`, `,` or `=` (a URL or two entries run together).
    #[error("contains whitespace or one of '/', ',', '='; give a bare HOST:PORT")]
    BadCharacter,
}

/// Why a spec is not a cluster kv can run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `--peers` did not parse.
    #[error(transparent)]
    Peers(#[from] PeersError),
    /// `--node-id` is not among the members.
    #[error("--node-id {node_id} is not in --peers (members: {members}); add it or fix the id")]
    NodeNotMember {
        /// The id given.
        node_id: u64,
        /// The member ids, comma-separated.
        members: String,
    },
    /// No members at all.
    #[error("a cluster needs at least one member")]
    NoMembers,
    /// `--replicas 0`.
    #[error("--replicas must be at least 1")]
    NoReplicas,
    /// More replicas than members to hold them.
    #[error("--replicas {replicas} but only {members} member(s) in --peers; give at most {members} or add members")]
    TooManyReplicas {
        /// The count given.
        replicas: u32,
        /// How many members there are.
        members: usize,
    },
    /// `--shards` outside 1..=[`MAX_SHARDS`].
    #[error("--shards {shards} is out of range; give 1..={max}")]
    ShardsOutOfRange {
        /// The count given.
        shards: u32,
        /// [`MAX_SHARDS`].
        max: u32,
    },
    /// A member's address is malformed (a spec built by hand or read from disk).
    #[error("member {id}: address {addr:?} {reason}")]
    BadMemberAddr {
        /// The member.
        id: u64,
        /// Its address.
        addr: String,
        /// What is wrong.
        reason: AddrProblem,
    },
    /// Two members share an address (a spec built by hand or read from disk).
    #[error("members {first} and {second} have the same address {addr}")]
    DuplicateAddr {
        /// The address.
        addr: String,
        /// One member.
        first: u64,
        /// The other.
        second: u64,
    },
}

/// Parses `--peers`: `ID=HOST:PORT` entries separated by commas, whitespace
/// around entries ignored. Ids and addresses must each be unique.
pub fn parse_peers(text: &str) -> Result<BTreeMap<u64, String>, PeersError> {
    if text.split(',').all(|entry| entry.trim().is_empty()) {
        return Err(PeersError::Empty);
    }
    let mut members: BTreeMap<u64, String> = BTreeMap::new();
    for (index, raw) in text.split(',').enumerate() {
        let entry = raw.trim();
        if entry.is_empty() {
            return Err(PeersError::EmptyEntry {
                position: index + 1,
            });
        }
        let Some((id_part, addr_part)) = entry.split_once('=') else {
            return Err(PeersError::MissingEquals {
                entry: entry.to_owned(),
            });
        };
        let (id_part, addr_part) = (id_part.trim(), addr_part.trim());
        let id: u64 = id_part.parse().map_err(|source| PeersError::BadId {
            entry: entry.to_owned(),
            id: id_part.to_owned(),
            source,
        })?;
        check_addr(addr_part).map_err(|reason| PeersError::BadAddr {
            entry: entry.to_owned(),
            addr: addr_part.to_owned(),
            reason,
        })?;
        if let Some(first) = members.get(&id) {
            return Err(PeersError::DuplicateId {
                id,
                first: first.clone(),
                second: addr_part.to_owned(),
            });
        }
        if let Some((&first, _)) = members.iter().find(|(_, addr)| *addr == addr_part) {
            return Err(PeersError::DuplicateAddr {
                addr: addr_part.to_owned(),
                first,
                second: id,
            });
        }
        members.insert(id, addr_part.to_owned());
    }
    Ok(members)
}

/// Formats members back as a `--peers` value (ids ascending), for messages
/// that tell the user what to type.
pub fn format_peers(members: &BTreeMap<u64, String>) -> String {
    let mut out = String::new();
    for (id, addr) in members {
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&format!("{id}={addr}"));
    }
    out
}

/// `HOST:PORT` with a non-empty host and a port in 1..=65535. Hosts are not
/// resolved here (a pure crate; names like `node1` are fine in Docker).
/// IPv6 hosts come in brackets, `[::1]:8081`, as `SocketAddr` prints them.
pub(crate) fn check_addr(addr: &str) -> Result<(), AddrProblem> {
    if addr
        .chars()
        .any(|c| c.is_whitespace() || matches!(c, '/' | ',' | '='))
    {
        return Err(AddrProblem::BadCharacter);
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(AddrProblem::NoPort);
    };
    if host.is_empty() {
        return Err(AddrProblem::NoHost);
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(AddrProblem::BadPort),
        Ok(_) => Ok(()),
    }
}

impl ClusterSpec {
    /// A validated spec from flags: `--node-id`, `--peers`, `--shards` and
    /// `--replicas` (defaults [`DEFAULT_SHARDS`], [`DEFAULT_REPLICAS`]).
    pub fn new(
        node_id: u64,
        peers: &str,
        shards: Option<u32>,
        replicas: Option<u32>,
    ) -> Result<Self, SpecError> {
        let spec = Self {
            node_id,
            shards: shards.unwrap_or(DEFAULT_SHARDS),
            replicas: replicas.unwrap_or(DEFAULT_REPLICAS),
            members: parse_peers(peers)?,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every rule [`ClusterSpec::new`] enforces; used on specs read
    /// back from `cluster.json` too.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.members.is_empty() {
            return Err(SpecError::NoMembers);
        }
        for (&id, addr) in &self.members {
            check_addr(addr).map_err(|reason| SpecError::BadMemberAddr {
                id,
                addr: addr.clone(),
                reason,
            })?;
            if let Some((&first, _)) = self.members.range(..id).find(|(_, other)| *other == addr) {
                return Err(SpecError::DuplicateAddr {
                    addr: addr.clone(),
                    first,
                    second: id,
                });
            }
        }
        if !self.members.contains_key(&self.node_id) {
            return Err(SpecError::NodeNotMember {
                node_id: self.node_id,
                members: self
                    .members
                    .keys()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            });
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(SpecError::ShardsOutOfRange {
                shards: self.shards,
                max: MAX_SHARDS,
            });
        }
        if self.replicas == 0 {
            return Err(SpecError::NoReplicas);
        }
        if self.replicas as usize > self.members.len() {
            return Err(SpecError::TooManyReplicas {
                replicas: self.replicas,
                members: self.members.len(),
            });
        }
        Ok(())
    }

    /// This node's own address.
    pub fn own_addr(&self) -> Option<&str> {
        self.members.get(&self.node_id).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const THREE: &str = "1=127.0.0.1:8081,2=127.0.0.1:8082,3=127.0.0.1:8083";

    #[test]
    fn parses_a_peer_list() {
        let members = parse_peers(THREE).unwrap();
        assert_eq!(members.len(), 3);
        assert_eq!(members[&2], "127.0.0.1:8082");
        // Whitespace around entries and parts is ignored; order does not matter.
        let shuffled =
            parse_peers(" 3 = 127.0.0.1:8083 , 1=127.0.0.1:8081,2=127.0.0.1:8082 ").unwrap();
        assert_eq!(shuffled, members);
        assert_eq!(format_peers(&members), THREE);
        // Names and bracketed IPv6 are addresses too.
        let named = parse_peers("7=node7:8081,8=[::1]:8082").unwrap();
        assert_eq!(named[&7], "node7:8081");
        assert_eq!(named[&8], "[::1]:8082");
    }

    #[test]
    fn peer_errors_name_the_bad_part() {
        let cases: &[(&str, PeersError, &str)] = &[
            ("", PeersError::Empty, "--peers is empty"),
            (" , ", PeersError::Empty, "--peers is empty"),
            (
                "1=a:1,,2=b:2",
                PeersError::EmptyEntry { position: 2 },
                "entry 2 is empty",
            ),
            (
                "1=a:1,",
                PeersError::EmptyEntry { position: 2 },
                "trailing comma",
            ),
            (
                "1=a:1,2:b:2",
                PeersError::MissingEquals {
                    entry: "2:b:2".into(),
                },
                "\"2:b:2\" has no '='",
            ),
            (
                "1=a:1,2=a:1",
                PeersError::DuplicateAddr {
                    addr: "a:1".into(),
                    first: 1,
                    second: 2,
                },
                "address a:1 to both node 1 and node 2",
            ),
            (
                "1=a:1,1=b:2",
                PeersError::DuplicateId {
                    id: 1,
                    first: "a:1".into(),
                    second: "b:2".into(),
                },
                "names node 1 twice",
            ),
        ];
        for (input, error, words) in cases {
            let got = parse_peers(input).unwrap_err();
            assert_eq!(&got, error, "{input:?}");
            assert!(got.to_string().contains(words), "{input:?}: {got}");
        }
        let bad_id = parse_peers("1=a:1,x2=b:2").unwrap_err();
        assert!(matches!(&bad_id, PeersError::BadId { id, .. } if id == "x2"));
        assert!(bad_id.to_string().contains("\"x2=b:2\""), "{bad_id}");
        assert!(std::error::Error::source(&bad_id).is_some());
        assert!(matches!(
            parse_peers("-1=a:1").unwrap_err(),
            PeersError::BadId { .. }
        ));
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let cases = [
            ("1=127.0.0.1", AddrProblem::NoPort),
            ("1=:8081", AddrProblem::NoHost),
            ("1=host:0", AddrProblem::BadPort),
            ("1=host:65536", AddrProblem::BadPort),
            ("1=host:http", AddrProblem::BadPort),
            ("1=host:", AddrProblem::BadPort),
            ("1=http://host:8081", AddrProblem::BadCharacter),
            ("1=a b:1", AddrProblem::BadCharacter),
            ("1=a:1=2", AddrProblem::BadCharacter),
        ];
        for (input, problem) in cases {
            match parse_peers(input) {
                Err(PeersError::BadAddr { reason, entry, .. }) => {
                    assert_eq!(reason, problem, "{input}");
                    assert_eq!(format!("1={}", &entry[2..]), entry);
                }
                other => panic!("{input}: {other:?}"),
            }
        }
    }

    #[test]
    fn spec_defaults_and_validation() {
        let spec = ClusterSpec::new(2, THREE, None, None).unwrap();
        assert_eq!(
            (spec.shards, spec.replicas),
            (DEFAULT_SHARDS, DEFAULT_REPLICAS)
        );
        assert_eq!(spec.own_addr(), Some("127.0.0.1:8082"));
        assert_eq!(
            ClusterSpec::new(1, "1=a:1", Some(1), Some(1))
                .unwrap()
                .shards,
            1
        );
        assert!(ClusterSpec::new(1, THREE, Some(MAX_SHARDS), Some(3)).is_ok());

        let err = ClusterSpec::new(4, THREE, None, None).unwrap_err();
        assert_eq!(
            err,
            SpecError::NodeNotMember {
                node_id: 4,
                members: "1,2,3".into()
            }
        );
        assert!(err.to_string().contains("--node-id 4 is not in --peers"));
        assert_eq!(
            ClusterSpec::new(1, THREE, None, Some(0)).unwrap_err(),
            SpecError::NoReplicas
        );
        let too_many = ClusterSpec::new(1, THREE, None, Some(4)).unwrap_err();
        assert_eq!(
            too_many,
            SpecError::TooManyReplicas {
                replicas: 4,
                members: 3
            }
        );
        assert!(
            too_many.to_string().contains("give at most 3"),
            "{too_many}"
        );
        for shards in [0, MAX_SHARDS + 1, u32::MAX] {
            assert_eq!(
                ClusterSpec::new(1, THREE, Some(shards), None).unwrap_err(),
                SpecError::ShardsOutOfRange {
                    shards,
                    max: MAX_SHARDS
                }
            );
        }
        assert!(matches!(
            ClusterSpec::new(1, "1=a", None, None).unwrap_err(),
            SpecError::Peers(PeersError::BadAddr { .. })
        ));
    }

    #[test]
    fn validate_catches_specs_built_by_hand() {
        let mut spec = ClusterSpec::new(1, THREE, None, None).unwrap();
        spec.members.insert(4, "127.0.0.1:8081".into());
        assert_eq!(
            spec.validate().unwrap_err(),
            SpecError::DuplicateAddr {
                addr: "127.0.0.1:8081".into(),
                first: 1,
                second: 4
            }
        );
        spec.members.insert(4, "nowhere".into());
        assert!(matches!(
            spec.validate().unwrap_err(),
            SpecError::BadMemberAddr { id: 4, .. }
        ));
        spec.members.clear();
        assert_eq!(spec.validate().unwrap_err(), SpecError::NoMembers);
    }
}
