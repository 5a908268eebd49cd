//! Headers the waypoint adds on the way to the endpoint: `x-forwarded-for`
//! (the original client appended), `traceparent` (a new span of the
//! incoming trace, or a new trace) and Istio's `baggage` (the source's peer
//! metadata from the CONNECT, when the request carries none).
use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

/// A parsed W3C `traceparent`: version 00, non-zero ids.
fn parse(v: &str) -> Option<(&str, &str)> {
    let mut it = v.trim().split('-');
    let (ver, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    let ok = ver == "00"
        && it.next().is_none()
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    ok.then_some((trace, flags))
}

/// The `traceparent` to send on: same trace id and flags as `incoming`
/// when that is valid, always a fresh span id.
pub fn next_traceparent(incoming: Option<&HeaderValue>) -> String {
    let span: u64 = rand::random::<u64>().max(1);
    match incoming.and_then(|v| v.to_str().ok()).and_then(parse) {
        Some((trace, flags)) => format!("00-{trace}-{span:016x}-{flags}"),
        None => {
            let trace: u128 = rand::random::<u128>().max(1);
            format!("00-{trace:032x}-{span:016x}-00")
        }
    }
}

/// The trace id of a `traceparent` (for the access log).
pub fn trace_id(v: &str) -> Option<&str> {
    parse(v).map(|(t, _)| t)
}

/// Appends `client` to `x-forwarded-for` (one header, comma-separated).
pub fn append_xff(headers: &mut HeaderMap, client: IpAddr) {
    let prior: Vec<String> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::to_string)
        .collect();
    let mut v = prior.join(", ");
    if !v.is_empty() {
        v.push_str(", ");
    }
    v.push_str(&client.to_canonical().to_string());
    if let Ok(v) = HeaderValue::from_str(&v) {
        headers.insert("x-forwarded-for", v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_keeps_the_trace_and_flags_with_a_new_span() {
        let inc = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let out = next_traceparent(Some(&inc));
        assert!(out.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{out}");
        assert!(out.ends_with("-01"));
        assert_ne!(&out[36..52], "00f067aa0ba902b7", "a new span id");
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            let out = next_traceparent(Some(&HeaderValue::from_static(bad)));
            assert!(
                parse(&out).is_some() && !out.contains("4bf92f") && !out.contains("4BF92F"),
                "{bad} -> {out}"
            );
        }
    }

    #[test]
    fn xff_is_appended() {
        let mut h = HeaderMap::new();
        append_xff(&mut h, "10.0.0.1".parse().unwrap());
        append_xff(&mut h, "::ffff:10.0.0.2".parse().unwrap());
        assert_eq!(h.get("x-forwarded-for").unwrap(), "10.0.0.1, 10.0.0.2");
    }
}
