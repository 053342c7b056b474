//! The TOML files brokerprobe reads (`--config`, probe maps, symbol maps): their errors
//! name the file and line, in one line.

use serde::de::DeserializeOwned;

/// Parses `text`, read from `origin`; an error reads `ORIGIN:LINE: what is wrong`.
pub fn parse<T: DeserializeOwned>(text: &str, origin: &str) -> Result<T, String> {
    toml::from_str(text).map_err(|e| {
        let first = e.message().lines().next().unwrap_or("not TOML");
        match e.span().map(|span| line_of(text, span.start)) {
            Some(line) => format!("{origin}:{line}: {first}"),
            None => format!("{origin}: {first}"),
        }
    })
}

/// 1-based line of byte `offset`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line() {
        let error = parse::<toml::Table>("a = 1\nb = \n", "f.toml").unwrap_err();
        assert!(error.starts_with("f.toml:2: "), "{error}");
        assert_eq!(line_of("a\nb\n", 2), 2);
        assert_eq!(line_of("a\nb\n", 0), 1);
    }
}
