//! The web dashboard (`--ui`): the static page at `/ui/`, compiled into the
//! binary from `ui/` at the repository root, so the server needs no files
//! at run time and the page fetches nothing from anywhere else.
//!
//! This module only hands out the files. The page itself talks to the
//! server like any other Connect client (`AdminService/List`,
//! `LockService/Watch`, `AdminService/ForceRelease`, with the bearer token
//! the operator typed), so it gets no right the token does not carry. It
//! must not touch the services or their authentication.

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use tonic::body::Body;

use super::protocols::text;

/// One file of the page: its path under `/ui/`, media type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/ui/",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../../ui/index.html"),
    },
    Asset {
        path: "/ui/app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../ui/app.js"),
    },
    Asset {
        path: "/ui/style.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../ui/style.css"),
    },
    Asset {
        path: "/ui/favicon.svg",
        content_type: "image/svg+xml",
        bytes: include_bytes!("../../ui/favicon.svg"),
    },
];

/// Strong validators of the assets, in [`ASSETS`] order: a browser
/// revalidates each load (`no-cache`) and gets a 304 while the binary is
/// the same, so an upgraded server never runs against a stale script.
static ETAGS: LazyLock<Vec<HeaderValue>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|a| {
            // FNV-1a: a validator, not a defence; the bytes are ours.
            let hash = a.bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
            HeaderValue::from_str(&format!("\"{hash:016x}-{}\"", a.bytes.len()))
                .unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
        })
        .collect()
});

/// The page's script and styles come from this server only, it calls only
/// this server, and no other site may frame it (a framed page could be
/// tricked into a force-release click).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `path` belongs to the dashboard: `/ui` and everything under
/// `/ui/`.
pub(super) fn owns(path: &str) -> bool {
    path == "/ui" || path.starts_with("/ui/")
}

/// Answers a request for a dashboard path (see [`owns`]).
pub(super) fn serve(req: &Request<Body>) -> Response<Body> {
    let path = req.uri().path();
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "the dashboard's files are read with GET\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    if path == "/ui" {
        // Relative URLs in the page resolve under /ui/ only with the slash.
        let mut response = text(StatusCode::PERMANENT_REDIRECT, "see /ui/\n");
        response
            .headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static("/ui/"));
        return response;
    }
    let path = if path == "/ui/index.html" {
        "/ui/"
    } else {
        path
    };
    let Some(index) = ASSETS.iter().position(|a| a.path == path) else {
        let mut response = text(StatusCode::NOT_FOUND, "no such file in the dashboard\n");
        no_store(&mut response);
        return response;
    };
    let asset = &ASSETS[index];
    let etag = ETAGS[index].clone();
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|given| given.as_bytes() == etag.as_bytes());
    let mut response = if fresh {
        let mut r = Response::new(Body::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let body = http_body_util::Full::new(Bytes::from_static(asset.bytes));
        let mut r = Response::new(Body::new(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, etag);
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// An error reply no cache keeps.
fn no_store(response: &mut Response<Body>) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Response<Body> {
        serve(&Request::get(path).body(Body::default()).expect("request"))
    }

    #[test]
    fn routes_and_headers() {
        assert!(owns("/ui") && owns("/ui/") && owns("/ui/x") && !owns("/uix"));
        let page = get("/ui/");
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert_eq!(page.headers()[header::CACHE_CONTROL], "no-cache");
        assert_eq!(get("/ui/app.js").status(), StatusCode::OK);
        assert_eq!(get("/ui").status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(get("/ui/nope.js").status(), StatusCode::NOT_FOUND);
        let etag = page.headers()[header::ETAG].clone();
        let again = serve(
            &Request::get("/ui/")
                .header(header::IF_NONE_MATCH, etag)
                .body(Body::default())
                .expect("request"),
        );
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    }
}
