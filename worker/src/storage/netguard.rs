//! Which addresses `http(s)://` reads may connect to.
//!
//! A job names its inputs, so without a guard a job could make the worker fetch from the
//! cluster's own services, the node, or the cloud metadata endpoint, and read what they answer
//! back from the job's status. [`HttpPolicy`] refuses, unless an allow CIDR covers the address:
//!
//! - loopback (127/8, ::1), unspecified and "this network" (0/8, ::), link-local (169.254/16,
//!   the metadata address 169.254.169.254 among them, fe80::/10), private networks (10/8,
//!   172.16/12, 192.168/16, fc00::/7), shared address space (100.64/10), multicast, broadcast
//!   and reserved space (224/4, 240/4, ff00::/8), IPv4-mapped and NAT64 forms of all of these;
//! - the configured deny CIDRs (the cluster's pod and service ranges).
//!
//! The check is made on the address actually connected to: names are resolved by
//! [`GuardedResolver`], which the HTTP client uses for every connection (redirect hops
//! included) and which hands back only allowed addresses, so a name can't resolve to a public
//! address when checked and to a private one when connected. Literal-IP hosts never reach a
//! resolver: they are checked before the request ([`HttpPolicy::check_url`]) and on every
//! redirect hop ([`redirect_policy`]), which also re-checks the scheme (plain `http://` only
//! with `allow_plain`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Redirect hops followed before a read fails.
pub const MAX_REDIRECTS: usize = 5;

/// An address range, `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// Whether `ip` lies in the range (an IPv4 range never contains an IPv6 address: callers
    /// unwrap mapped addresses first).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Ranges refused unless an allow CIDR covers the address.
const DENIED: &[Cidr] = &[
    Cidr::v4(0, 0, 0, 0, 8),                     // unspecified, "this network"
    Cidr::v4(10, 0, 0, 0, 8),                    // RFC 1918
    Cidr::v4(100, 64, 0, 0, 10),                 // shared address space (CGNAT)
    Cidr::v4(127, 0, 0, 0, 8),                   // loopback
    Cidr::v4(169, 254, 0, 0, 16),                // link-local, cloud metadata
    Cidr::v4(172, 16, 0, 0, 12),                 // RFC 1918
    Cidr::v4(192, 0, 0, 0, 24),                  // IETF protocol assignments
    Cidr::v4(192, 168, 0, 0, 16),                // RFC 1918
    Cidr::v4(198, 18, 0, 0, 15),                 // benchmarking
    Cidr::v4(224, 0, 0, 0, 4),                   // multicast
    Cidr::v4(240, 0, 0, 0, 4),                   // reserved, broadcast
    Cidr::v6([0; 8], 128),                       // unspecified
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),     // loopback
    Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),  // unique local
    Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), // link-local
    Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10), // site-local (deprecated)
    Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),  // multicast
];

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`) or NAT64 (`64:ff9b::a.b.c.d`)
/// address, which reaches that IPv4 host; any other address as it is.
fn unwrap_v4(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [_, _, _, _, _, _, hi, lo] = s;
                return IpAddr::V4(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)));
            }
            ip
        }
        v4 => v4,
    }
}

/// Why the policy refused a URL or an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("plain http is not allowed")]
    Scheme,
    #[error("address not allowed")]
    Address,
}

/// Which `http(s)://` locations reads may reach. The default allows https to public
/// addresses only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpPolicy {
    /// Allow plain `http://` (default: https only).
    pub allow_plain: bool,
    /// Ranges allowed even where a built-in or configured deny covers them.
    pub allow: Vec<Cidr>,
    /// Ranges refused besides the built-in ones (the cluster's pod and service CIDRs).
    pub deny: Vec<Cidr>,
}

impl HttpPolicy {
    /// Whether a connection to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let inner = unwrap_v4(ip);
        if self
            .allow
            .iter()
            .any(|c| c.contains(ip) || c.contains(inner))
        {
            return true;
        }
        !DENIED
            .iter()
            .chain(&self.deny)
            .any(|c| c.contains(ip) || c.contains(inner))
    }

    /// Checks a URL's scheme, and its host when the host is an IP literal (names are checked
    /// by [`GuardedResolver`] on the addresses they resolve to).
    pub fn check_url(&self, url: &Url) -> Result<(), Refused> {
        match url.scheme() {
            "https" => {}
            "http" if self.allow_plain => {}
            _ => return Err(Refused::Scheme),
        }
        let literal = match url.host() {
            Some(Host::Ipv4(v4)) => Some(IpAddr::V4(v4)),
            Some(Host::Ipv6(v6)) => Some(IpAddr::V6(v6)),
            Some(Host::Domain(_)) => None,
            None => return Err(Refused::Address),
        };
        match literal {
            Some(ip) if !self.allows(ip) => Err(Refused::Address),
            _ => Ok(()),
        }
    }
}

/// Resolves names with the system resolver and keeps only the addresses the policy allows;
/// fails with [`Refused::Address`] when it allows none of them.
pub struct GuardedResolver {
    policy: Arc<HttpPolicy>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<HttpPolicy>) -> Self {
        GuardedResolver { policy }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if resolved.is_empty() {
                return Err(format!("{host}: no addresses").into());
            }
            let allowed: Vec<SocketAddr> = resolved
                .into_iter()
                .filter(|a| policy.allows(a.ip()))
                .collect();
            if allowed.is_empty() {
                return Err(Box::new(Refused::Address) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// Follows at most [`MAX_REDIRECTS`] hops, each re-checked with [`HttpPolicy::check_url`].
pub fn redirect_policy(policy: Arc<HttpPolicy>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error("too many redirects");
        }
        match policy.check_url(attempt.url()) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

/// The policy's refusal somewhere in an error's chain of causes.
pub fn refusal(e: &(dyn std::error::Error + 'static)) -> Option<Refused> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refused>() {
            return Some(*r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn built_in_ranges_are_refused_and_public_addresses_allowed() {
        let p = HttpPolicy::default();
        let denied = [
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "169.254.169.254",
            "169.254.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "192.0.0.170",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
            "::ffff:192.168.0.1",
            "64:ff9b::a9fe:a9fe",
        ];
        for a in denied {
            assert!(!p.allows(ip(a)), "{a} must be refused");
        }
        let allowed = [
            "1.1.1.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.253.255.255",
            "192.169.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2001:4860:4860::8888",
        ];
        for a in allowed {
            assert!(p.allows(ip(a)), "{a} must be allowed");
        }
    }

    #[test]
    fn configured_deny_adds_and_allow_overrides() {
        let p = HttpPolicy {
            allow_plain: false,
            allow: cidrs(&["127.0.0.2/32", "10.96.0.10"]),
            deny: cidrs(&["203.0.113.0/24", "2001:db8::/32"]),
        };
        assert!(p.allows(ip("127.0.0.2")));
        assert!(
            p.allows(ip("::ffff:127.0.0.2")),
            "mapped form of an allowed address"
        );
        assert!(!p.allows(ip("127.0.0.1")));
        assert!(p.allows(ip("10.96.0.10")));
        assert!(!p.allows(ip("10.96.0.11")));
        assert!(!p.allows(ip("203.0.113.7")));
        assert!(!p.allows(ip("::ffff:203.0.113.7")));
        assert!(!p.allows(ip("2001:db8:1::5")));
        assert!(p.allows(ip("203.0.114.1")));

        let over = HttpPolicy {
            allow: cidrs(&["203.0.113.128/25"]),
            deny: cidrs(&["203.0.113.0/24"]),
            ..HttpPolicy::default()
        };
        assert!(over.allows(ip("203.0.113.200")), "allow wins over deny");
        assert!(!over.allows(ip("203.0.113.100")));
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap(),
            Cidr::v4(10, 0, 0, 0, 8)
        );
        assert_eq!(
            " 127.0.0.1 ".parse::<Cidr>().unwrap(),
            Cidr::v4(127, 0, 0, 1, 32)
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().to_string(), "::1/128");
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("9.9.9.9")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("2001::1")));
        for bad in ["10.0.0.0/33", "::/129", "example.com", "10.0.0.0/x", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn urls_check_scheme_and_literal_hosts() {
        let p = HttpPolicy::default();
        let check = |p: &HttpPolicy, u: &str| p.check_url(&Url::parse(u).unwrap());
        assert_eq!(check(&p, "http://example.com/x"), Err(Refused::Scheme));
        assert_eq!(check(&p, "https://example.com/x"), Ok(()));
        assert_eq!(check(&p, "https://1.1.1.1/x"), Ok(()));
        for u in [
            "https://127.0.0.1/x",
            "https://[::1]/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::ffff:169.254.169.254]/x",
            "https://2130706433/x",
            "https://0x7f.1/x",
        ] {
            assert_eq!(check(&p, u), Err(Refused::Address), "{u}");
        }
        let plain = HttpPolicy {
            allow_plain: true,
            ..HttpPolicy::default()
        };
        assert_eq!(check(&plain, "http://example.com/x"), Ok(()));
        assert_eq!(check(&plain, "http://10.0.0.1/x"), Err(Refused::Address));
        assert_eq!(check(&plain, "ftp://example.com/x"), Err(Refused::Scheme));
    }
}
