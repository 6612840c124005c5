//! Admission of inbound connections before they authenticate.
//!
//! An unauthenticated connection costs a socket, a task and a handshake; a single host opening
//! many of them must not lock friends out (issue 11, fault 3). Three rules, all pure logic here
//! (the network actor calls [`Admission::admit`] on accept and [`Admission::release`] when the
//! session authenticates or ends):
//!
//! * at most `per_address` connections from one source IP are handshaking at once;
//! * at most `max_pending` are handshaking in total, of which `friend_reserve` slots are only
//!   for *friend hosts*: IPs a friend connected from, or named in a friend's contacts;
//! * a connection must authenticate within `preauth_timeout` (enforced by the session's
//!   handshake timer, which the network actor sets from [`Limits::preauth_timeout`]).
//!
//! Refused connections are closed at once (no bytes sent: the peer has not proved anything).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

/// The limits, from `[network]` in config.toml.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections handshaking at once, all sources together.
    pub max_pending: usize,
    /// Connections handshaking at once from one source IP.
    pub per_address: usize,
    /// Of `max_pending`, slots only friend hosts may take.
    pub friend_reserve: usize,
    /// Time an inbound connection has to complete the handshake and identity exchange.
    pub preauth_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pending: 64,
            per_address: 8,
            friend_reserve: 16,
            preauth_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a connection was not admitted; `name` is its counter key in `status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections handshaking from this address")]
    PerAddress,
    #[error("too many connections handshaking")]
    Full,
}

impl Refused {
    pub fn name(self) -> &'static str {
        match self {
            Refused::PerAddress => "TooManyFromAddress",
            Refused::Full => "TooManyConnections",
        }
    }
}

/// Connections being admitted, by session id.
#[derive(Debug, Default)]
pub struct Admission {
    limits: Limits,
    pending: HashMap<u64, IpAddr>,
    per_ip: HashMap<IpAddr, usize>,
    /// Hosts named in friends' contacts (replaced whenever the friend list changes).
    contact_hosts: HashSet<IpAddr>,
    /// Hosts friends authenticated from (kept for the node's lifetime; bounded by how many
    /// distinct addresses friends ever authenticate from).
    seen_hosts: HashSet<IpAddr>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            ..Admission::default()
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn is_friend_host(&self, ip: &IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.contact_hosts.contains(&ip) || self.seen_hosts.contains(&ip)
    }

    /// Admits connection `session` from `ip`, or says why not. Admitting an id twice is a
    /// caller bug and changes nothing.
    pub fn admit(&mut self, session: u64, ip: IpAddr) -> Result<(), Refused> {
        // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        if self.pending.contains_key(&session) {
            return Ok(());
        }
        let source = source_bucket(ip);
        if self.per_ip.get(&source).copied().unwrap_or(0) >= self.limits.per_address {
            return Err(Refused::PerAddress);
        }
        let room = if self.is_friend_host(&ip) {
            self.limits.max_pending
        } else {
            self.limits
                .max_pending
                .saturating_sub(self.limits.friend_reserve)
        };
        if self.pending.len() >= room {
            return Err(Refused::Full);
        }
        self.pending.insert(session, source);
        *self.per_ip.entry(source).or_default() += 1;
        Ok(())
    }

    /// The connection authenticated or ended: its slot is free. Unknown ids are ignored, so
    /// both events may release the same session.
    pub fn release(&mut self, session: u64) {
        let Some(ip) = self.pending.remove(&session) else {
            return;
        };
        if let Some(n) = self.per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }

    /// A friend authenticated from `ip`: later connections from there get the reserved room.
    pub fn friend_seen_at(&mut self, ip: IpAddr) {
        self.seen_hosts.insert(ip.to_canonical());
    }

    /// Replaces the hosts taken from friends' contacts (`tcp://HOST:PORT`, literal IPs only:
    /// resolving names here would let a friend's DNS stall the accept path).
    pub fn set_friend_contacts<'a>(&mut self, contacts: impl IntoIterator<Item = &'a str>) {
        self.contact_hosts = contacts.into_iter().filter_map(contact_ip).collect();
    }

    /// Connections handshaking now.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// What the per-address limit counts: an IPv4 address, or an IPv6 address's /64 (one host
/// usually holds a whole /64, so counting /128s would give it 2^64 times the limit; security
/// review L3). `ip` is canonical (IPv4-mapped addresses are IPv4).
fn source_bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(std::net::Ipv6Addr::from(octets))
        }
    }
}

/// The IP of a `tcp://IP:PORT` contact, if it is a literal address.
fn contact_ip(contact: &str) -> Option<IpAddr> {
    let addr = contact.strip_prefix("tcp://")?;
    addr.parse::<std::net::SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn limits() -> Limits {
        Limits {
            max_pending: 10,
            per_address: 3,
            friend_reserve: 4,
            preauth_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn one_address_gets_at_most_per_address_slots() {
        let mut a = Admission::new(limits());
        for id in 0..3 {
            assert_eq!(a.admit(id, ip("10.0.0.1")), Ok(()));
        }
        assert_eq!(a.admit(3, ip("10.0.0.1")), Err(Refused::PerAddress));
        // Another address is not affected.
        assert_eq!(a.admit(4, ip("10.0.0.2")), Ok(()));
        // A released slot can be taken again.
        a.release(1);
        assert_eq!(a.admit(5, ip("10.0.0.1")), Ok(()));
        assert_eq!(a.admit(6, ip("10.0.0.1")), Err(Refused::PerAddress));
        assert_eq!(a.pending(), 4);
    }

    /// Security review L3: addresses of one IPv6 /64 share the per-address limit (it was per
    /// /128); another /64 has its own.
    #[test]
    fn one_ipv6_64_counts_as_one_address() {
        let mut a = Admission::new(limits());
        for id in 0..3 {
            assert_eq!(
                a.admit(id, ip(&format!("2001:db8:0:1::{}", id + 1))),
                Ok(())
            );
        }
        assert_eq!(
            a.admit(3, ip("2001:db8:0:1:ffff:ffff:ffff:ffff")),
            Err(Refused::PerAddress)
        );
        assert_eq!(a.admit(4, ip("2001:db8:0:2::1")), Ok(()));
        a.release(0);
        assert_eq!(a.admit(5, ip("2001:db8:0:1::99")), Ok(()));
    }

    #[test]
    fn strangers_leave_the_reserve_to_friends() {
        let mut a = Admission::new(limits());
        a.set_friend_contacts(["tcp://192.0.2.7:7771", "tcp://friend.example:7771"]);
        a.friend_seen_at(ip("198.51.100.9"));
        // 6 = max_pending - friend_reserve strangers, from distinct addresses.
        for id in 0..6 {
            assert_eq!(a.admit(id, ip(&format!("10.0.1.{id}"))), Ok(()));
        }
        assert_eq!(a.admit(100, ip("10.0.2.1")), Err(Refused::Full));
        // Friends' hosts (by contact or by an earlier login) still get in, up to max_pending.
        assert_eq!(a.admit(101, ip("192.0.2.7")), Ok(()));
        assert_eq!(a.admit(102, ip("198.51.100.9")), Ok(()));
        assert_eq!(a.admit(103, ip("192.0.2.7")), Ok(()));
        assert_eq!(a.admit(104, ip("198.51.100.9")), Ok(()));
        assert_eq!(a.admit(105, ip("192.0.2.7")), Err(Refused::Full));
        // A name in a contact is not resolved: it reserves nothing.
        assert!(!a.is_friend_host(&ip("127.0.0.1")));
    }

    #[test]
    fn release_is_idempotent_and_admit_of_a_known_id_is_a_no_op() {
        let mut a = Admission::new(limits());
        assert_eq!(a.admit(1, ip("10.0.0.1")), Ok(()));
        assert_eq!(a.admit(1, ip("10.0.0.1")), Ok(()));
        assert_eq!(a.pending(), 1);
        a.release(1);
        a.release(1);
        a.release(99);
        assert_eq!(a.pending(), 0);
        for id in 2..5 {
            assert_eq!(a.admit(id, ip("10.0.0.1")), Ok(()));
        }
        assert_eq!(a.admit(5, ip("10.0.0.1")), Err(Refused::PerAddress));
    }

    #[test]
    fn new_contacts_replace_the_old() {
        let mut a = Admission::new(limits());
        a.set_friend_contacts(["tcp://192.0.2.7:1"]);
        assert!(a.is_friend_host(&ip("192.0.2.7")));
        a.set_friend_contacts(["tcp://[2001:db8::1]:1"]);
        assert!(!a.is_friend_host(&ip("192.0.2.7")));
        assert!(a.is_friend_host(&ip("2001:db8::1")));
    }

    #[test]
    fn ipv4_mapped_addresses_are_the_same_host() {
        let mut a = Admission::new(limits());
        a.set_friend_contacts(["tcp://192.0.2.7:1"]);
        assert!(a.is_friend_host(&ip("::ffff:192.0.2.7")));
        for id in 0..3 {
            assert_eq!(a.admit(id, ip("::ffff:10.0.0.1")), Ok(()));
        }
        assert_eq!(a.admit(3, ip("10.0.0.1")), Err(Refused::PerAddress));
    }
}
