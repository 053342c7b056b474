//! HTTP/1.1 request and status lines from the first bytes of a message. Only the method,
//! the path without its query (query strings carry keys and user data) and the status are
//! kept; bytes that are not plaintext HTTP/1.x yield nothing.

/// Longest path kept; longer ones end in `…`.
const PATH_CAP: usize = 64;

const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT", "TRACE",
];

/// `METHOD /path HTTP/1.x` → (method, path).
pub fn request_line(prefix: &[u8]) -> Option<(&'static str, String)> {
    let line = first_line(prefix)?;
    let mut parts = line.splitn(3, |b| *b == b' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let method = METHODS.into_iter().find(|m| m.as_bytes() == method)?;
    if !target.starts_with(b"/") {
        return None;
    }
    if parts
        .next()
        .is_some_and(|version| !version.starts_with(b"HTTP/1."))
    {
        return None;
    }
    let path = target.split(|b| *b == b'?').next().unwrap_or_default();
    let mut path: String = path
        .iter()
        .map(|b| *b as char)
        .filter(|c| c.is_ascii_graphic())
        .take(PATH_CAP)
        .collect();
    if path.len() == PATH_CAP && target.len() > PATH_CAP {
        path.push('…');
    }
    Some((method, path))
}

/// `HTTP/1.x 200 ...` → 200.
pub fn status_line(prefix: &[u8]) -> Option<u16> {
    let rest = prefix.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

/// The bytes before the first CR or LF; the whole prefix if it was cut before one.
fn first_line(prefix: &[u8]) -> Option<&[u8]> {
    let end = prefix
        .iter()
        .position(|b| *b == b'\r' || *b == b'\n')
        .unwrap_or(prefix.len());
    (end > 0).then(|| &prefix[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            request_line(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"),
            Some(("POST", "/v1/chat/completions".into()))
        );
        assert_eq!(
            request_line(b"GET /v1/models?api-key=SECRET HTTP/1.1\r\n"),
            Some(("GET", "/v1/models".into()))
        );
        // Cut before the version: still a request line.
        assert_eq!(
            request_line(b"GET /health"),
            Some(("GET", "/health".into()))
        );
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(200));
        let (_, path) = request_line(long.as_bytes()).unwrap();
        assert!(path.ends_with('…') && path.chars().count() == PATH_CAP + 1);
    }

    #[test]
    fn not_http_is_nothing() {
        assert_eq!(request_line(b"\x16\x03\x01\x02\x00"), None); // TLS ClientHello
        assert_eq!(request_line(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(request_line(b"BREW /pot HTTP/1.1\r\n"), None);
        assert_eq!(request_line(b"GET /x SPDY/3\r\n"), None);
        assert_eq!(request_line(b""), None);
        assert_eq!(
            request_line(b"GET /a\x00\x1b[2Jb HTTP/1.1"),
            Some(("GET", "/a[2Jb".into()))
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_line(b"HTTP/1.0 503 Service Unavailable"), Some(503));
        assert_eq!(status_line(b"HTTP/1.1 20"), None);
        assert_eq!(status_line(b"HTTP/2 200"), None);
        assert_eq!(status_line(b"data: {}\n\n"), None);
    }
}
