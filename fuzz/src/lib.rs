//! Helpers the fuzz targets share: inputs are text where the product reads
//! text, so the seed corpora are real, readable inputs from the tests.

/// A request head in the text form the seeds use: `METHOD TARGET` on the
/// first line, then `name: value` lines (`\r` ends are dropped). `None`
/// when `http` itself refuses a part (h2 and hyper would not deliver such
/// a request either).
pub fn request(head: &[u8]) -> Option<http::Request<()>> {
    let mut lines = head.split(|b| *b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let first = lines.next()?;
    let mut words = first.splitn(2, |b| *b == b' ');
    let method = http::Method::from_bytes(words.next()?).ok()?;
    let uri = http::Uri::try_from(words.next().unwrap_or(b"/")).ok()?;
    let mut b = http::Request::builder().method(method).uri(uri);
    for (name, value) in lines.filter_map(header) {
        b = b.header(
            http::HeaderName::from_bytes(name).ok()?,
            http::HeaderValue::from_bytes(value).ok()?,
        );
    }
    b.body(()).ok()
}

/// `name: value` (value without the spaces around it), raw.
pub fn header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|b| *b == b':')?;
    let value = &line[colon + 1..];
    let start = value.iter().position(|b| *b != b' ').unwrap_or(value.len());
    Some((&line[..colon], &value[start..]))
}

/// `text` split at the first line that is exactly `marker`: (before, after).
pub fn split_at_line<'a>(text: &'a str, marker: &str) -> (&'a str, Option<&'a str>) {
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_end_matches(['\r', '\n']) == marker {
            return (&text[..at], Some(&text[at + line.len()..]));
        }
        at += line.len();
    }
    (text, None)
}
