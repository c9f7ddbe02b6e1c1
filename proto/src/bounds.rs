//! Helpers for keeping strings inside their documented bounds.

/// `s` cut to at most `max` bytes, on a character boundary.
pub(crate) fn clip(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end = end.saturating_sub(1);
    }
    s.get(..end).unwrap_or_default().to_owned()
}

/// Whether every byte is printable ASCII (space through `~`).
pub(crate) fn is_printable_ascii(s: &str) -> bool {
    s.bytes().all(|b| (b' '..=b'~').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_strings_whole() {
        assert_eq!(clip("abc", 10), "abc");
    }

    #[test]
    fn clip_cuts_on_a_char_boundary() {
        // "é" is two bytes; cutting at 2 would split it.
        assert_eq!(clip("aé", 2), "a");
        assert_eq!(clip("aé", 3), "aé");
    }

    #[test]
    fn control_characters_are_not_printable() {
        assert!(is_printable_ascii("info,dev_blk=trace"));
        assert!(!is_printable_ascii("info\n"));
        assert!(!is_printable_ascii("é"));
    }
}
