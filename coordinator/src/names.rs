//! Strings that peers choose (worker names, request paths) are escaped before they reach the log,
//! so a hostile name cannot forge log lines or terminal escapes.

/// Longest worker name a registration may carry, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// `text` with control characters, quotes and backslashes escaped (Rust's `escape_debug`), cut to
/// at most `max_chars` characters of output (marked with `…`).
pub fn escape(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars));
    for (i, c) in text.chars().flat_map(char::escape_debug).enumerate() {
        if i == max_chars {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_names_cannot_forge_lines_or_escapes() {
        let forged = "w1\n2026-01-01T00:00:00Z  INFO coordinator: worker 9 joined\x1b[2J";
        let escaped = escape(forged, 200);
        assert!(
            !escaped.contains('\n') && !escaped.contains('\x1b'),
            "{escaped}"
        );
        assert!(
            escaped.contains("\\n") && escaped.contains("\\u{1b}"),
            "{escaped}"
        );
        assert_eq!(escape("host-1 (pid 7)", 200), "host-1 (pid 7)");
        assert_eq!(escape(&"x".repeat(300), 10), format!("{}…", "x".repeat(10)));
    }
}
