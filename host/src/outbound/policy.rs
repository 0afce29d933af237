//! Addresses a guest must not reach through a wildcard rule.

use std::net::IpAddr;

/// Addresses a guest reaches only through an exact rule: the node's own
/// services and the cloud's metadata endpoints.
///
/// - IPv4: `0.0.0.0/8` ("this network"), loopback `127.0.0.0/8`,
///   link-local `169.254.0.0/16` (AWS, GCP and Azure metadata), and the
///   shared address space `100.64.0.0/10` (Alibaba's metadata, carrier NAT).
/// - IPv6: `::`, `::1`, link-local `fe80::/10`, AWS's `fd00:ec2::254`.
/// - IPv4 written as IPv6 is judged as the IPv4 address it carries: mapped
///   (`::ffff:a.b.c.d`), compatible (`::a.b.c.d`) and NAT64
///   (`64:ff9b::a.b.c.d`). A NAT64 address of a public IPv4 address stays
///   reachable, as IPv6-only clusters need it for all their egress.
pub fn is_restricted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            a == 0 || v4.is_loopback() || v4.is_link_local() || (a == 100 && (b & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let seg = v6.segments();
            let embedded = || {
                let [.., c, d] = seg;
                std::net::Ipv4Addr::from(((c as u32) << 16) | d as u32)
            };
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_restricted(IpAddr::V4(v4));
            }
            if seg[..6] == [0; 6] {
                // `::`, `::1` and the IPv4-compatible `::a.b.c.d`.
                return v6.is_unspecified() || v6.is_loopback() || is_restricted(embedded().into());
            }
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return is_restricted(embedded().into());
            }
            (seg[0] & 0xffc0) == 0xfe80
                || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restricted_addresses() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.100.100.200",
            "100.127.255.255",
            "::",
            "::1",
            "fe80::1",
            "febf::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::169.254.169.254",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            assert!(is_restricted(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "10.0.0.1",
            "8.8.8.8",
            "100.63.255.255",
            "100.128.0.0",
            "2001:db8::1",
            "fd00:ec2::253",
            "fec0::1",
            "::ffff:8.8.8.8",
            "64:ff9b::8.8.8.8",
        ] {
            assert!(!is_restricted(ip.parse().unwrap()), "{ip}");
        }
    }
}
