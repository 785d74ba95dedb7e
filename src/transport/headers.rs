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
pub const X_TOLLGATE_ATTEMPTS: HeaderName = HeaderName::from_static("x-tollgate-attempts");

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
