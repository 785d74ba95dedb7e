//! Header hygiene shared by both directions: which fields are hop-by-hop (RFC 9110 7.6.1)
//! and must not cross the gateway, including any the `Connection` header nominates.
//! Pingora strips these only on its native proxy path, which the attempt loop bypasses.

use http::header::HeaderName;
use http::HeaderMap;

/// The hop-by-hop fields as names, for removing them from a map without parsing.
pub const HOP_BY_HOP_NAMES: [HeaderName; 9] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_UPSTREAM_REQUEST_ID: HeaderName = HeaderName::from_static("x-upstream-request-id");
pub const X_TOLLGATE_UPSTREAM: HeaderName = HeaderName::from_static("x-tollgate-upstream");
pub const X_TOLLGATE_TRACE_ID: HeaderName = HeaderName::from_static("x-tollgate-trace-id");
pub const X_TOLLGATE_ATTEMPTS: HeaderName = HeaderName::from_static("x-tollgate-attempts");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
pub const ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");

/// An IP address as text; IPv4 without the formatting machinery (it is written twice a
/// request: the access log's client and the forwarded-for field).
pub fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(_) => {
            use std::fmt::Write as _;
            let _ = write!(out, "{ip}");
        }
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// True when `name` must not be forwarded: a hop-by-hop field, or one listed in
/// `Connection` (`nominated`, lowercase).
pub fn is_hop_by_hop(name: &HeaderName, nominated: &[String]) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n) || nominated.iter().any(|x| x == n)
}

/// The field names a `Connection` header lists, lowercased.
pub fn connection_nominated(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "close" && t != "keep-alive")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.199.255",
            "255.9.100.1",
            "::1",
            "2001:db8::7",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut s = String::new();
            push_ip(&mut s, ip);
            assert_eq!(s, ip.to_string());
        }
    }

    #[test]
    fn connection_nominated_fields_are_hop_by_hop() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, X-Secret-Hop".parse().unwrap());
        let nominated = connection_nominated(&h);
        assert_eq!(nominated, vec!["x-secret-hop".to_string()]);
        assert!(is_hop_by_hop(
            &HeaderName::from_static("x-secret-hop"),
            &nominated
        ));
        assert!(is_hop_by_hop(
            &HeaderName::from_static("transfer-encoding"),
            &[]
        ));
        assert!(!is_hop_by_hop(
            &HeaderName::from_static("content-type"),
            &nominated
        ));
    }
}
