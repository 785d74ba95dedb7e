//! The admin console: one page, its script and its style sheet, embedded in the binary
//! and served by the admin listener under `/ui/`. They hold no secret: the page asks for
//! the master (or viewer) key, keeps it in the tab's session storage and sends it as a
//! bearer header to the same admin API the CLI uses, so every action leaves the same
//! audit rows. The content security policy allows nothing from another origin: the page
//! makes no request outside the admin listener and works offline.

use http::Response;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// The console's answer for `path`, or `None` when the path is not the console's.
pub fn serve(path: &str) -> Option<Response<Vec<u8>>> {
    let (body, content_type) = match path {
        "/ui" => return Some(redirect("/ui/")),
        "/ui/" | "/ui/index.html" => (INDEX, "text/html; charset=utf-8"),
        "/ui/app.js" => (SCRIPT, "text/javascript; charset=utf-8"),
        "/ui/app.css" => (STYLE, "text/css; charset=utf-8"),
        p if p.starts_with("/ui/") => return Some(not_found()),
        _ => return None,
    };
    let mut r = Response::new(body.as_bytes().to_vec());
    let headers = r.headers_mut();
    for (name, value) in [
        ("content-type", content_type),
        ("content-security-policy", POLICY),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        ("cache-control", "no-cache"),
    ] {
        headers.insert(name, http::HeaderValue::from_static(value));
    }
    headers.insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(body.len()),
    );
    Some(r)
}

fn redirect(to: &'static str) -> Response<Vec<u8>> {
    let mut r = Response::new(Vec::new());
    *r.status_mut() = http::StatusCode::MOVED_PERMANENTLY;
    r.headers_mut()
        .insert(http::header::LOCATION, http::HeaderValue::from_static(to));
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(0));
    r
}

fn not_found() -> Response<Vec<u8>> {
    let body = b"not found".to_vec();
    let mut r = Response::new(body);
    *r.status_mut() = http::StatusCode::NOT_FOUND;
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(9));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_console_loads_nothing_from_another_origin() {
        for path in ["/ui/", "/ui/app.js", "/ui/app.css"] {
            let r = serve(path).unwrap();
            assert_eq!(r.status(), 200);
            assert!(r.headers()["content-security-policy"]
                .to_str()
                .unwrap()
                .contains("default-src 'none'"));
            let text = String::from_utf8(r.into_body()).unwrap();
            for outside in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(outside), "{path} mentions {outside}");
            }
        }
        assert_eq!(serve("/ui").unwrap().status(), 301);
        assert_eq!(serve("/ui/nope").unwrap().status(), 404);
        assert!(serve("/admin/keys").is_none());
    }
}
