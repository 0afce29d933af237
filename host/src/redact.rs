//! URLs as logs, spans and `/info` may show them.
//!
//! Presigned module URLs and guests' outbound calls carry credentials in
//! the userinfo (`https://user:pass@host`) and in query values
//! (`?X-Amz-Signature=...`, `?token=...`). Following the OpenTelemetry HTTP
//! semantic conventions for `url.full`, the userinfo is dropped and every
//! query value is replaced by `REDACTED`, keeping the keys so the URL still
//! says what it is. `log.redact_query = false` keeps query values, for
//! operators who know their URLs carry none.

use std::sync::atomic::{AtomicBool, Ordering};

static KEEP_QUERY: AtomicBool = AtomicBool::new(false);

/// Sets whether query values are kept (from `log.redact_query`).
pub fn keep_query_values(keep: bool) {
    KEEP_QUERY.store(keep, Ordering::Relaxed);
}

/// `url` without userinfo and, unless kept, with its query values
/// replaced. Text that is not a URL is returned with anything before an
/// `@` in its authority dropped all the same.
pub fn url(url: &str) -> String {
    // The userinfo goes first, judged on the authority alone (up to the
    // first `/`): a password may hold a `?` or `#` that would otherwise
    // split it into what looks like a query.
    let url = match url.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
            format!("{scheme}://{host}{path}")
        }
        None => url.to_owned(),
    };
    let (before_fragment, _) = url.split_once('#').unwrap_or((&url, ""));
    let Some((head, query)) = before_fragment.split_once('?') else {
        return before_fragment.to_owned();
    };
    if KEEP_QUERY.load(Ordering::Relaxed) {
        return format!("{head}?{query}");
    }
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) => format!("{k}=REDACTED"),
            None => pair.to_owned(),
        })
        .collect();
    format!("{head}?{}", redacted.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn userinfo_and_query_values_never_show() {
        assert_eq!(
            url(
                "https://alice:s3cret@bucket.example/m.wasm?X-Amz-Signature=abc&X-Amz-Expires=300#frag"
            ),
            "https://bucket.example/m.wasm?X-Amz-Signature=REDACTED&X-Amz-Expires=REDACTED"
        );
        assert_eq!(url("http://token@h:8080?flag"), "http://h:8080?flag");
        assert_eq!(url("http://h/p/a@b?x="), "http://h/p/a@b?x=REDACTED");
        assert_eq!(url("/modules/hello.wasm"), "/modules/hello.wasm");
        // Characters that end a URL's path inside a password.
        for leaky in [
            "http://u:p?ss@h/m.wasm",
            "http://u:p#ss@h/m.wasm",
            "http://u:p?s=1@h",
        ] {
            let shown = url(leaky);
            assert!(
                !shown.contains("u:p") && !shown.contains("ss"),
                "{leaky} -> {shown}"
            );
        }
    }
}
