//! Limits checked on descriptor text before any YAML parsing.
//!
//! The YAML parser's cost grows with nesting: 1.9 MB of `[` took 9 s of CPU before it
//! failed (libyaml builds every event before `serde_yaml_ng`'s own recursion limit
//! applies). So the size is checked first, then a linear pre-scan measures the nesting
//! depth — flow brackets `[`/`{` plus block indentation levels — and refuses a document
//! deeper than [`MAX_DESCRIPTOR_DEPTH`] without parsing it.
//!
//! The scan is a lexer for the parts of YAML that nest, not a parser. Where it cannot
//! tell, it errs towards counting more (a `[` inside a plain scalar counts), never
//! fewer, so that it cannot be talked into letting a deep document through. It skips
//! quoted scalars, comments and the content lines of block scalars (`|`, `>`), which
//! the parser reads as text.

/// Largest descriptor accepted, in bytes of YAML text. The largest real descriptors
/// (an NSD of ~2000 VNFs, a VNFD with long cloud-init data) stay well below it.
pub const MAX_DESCRIPTOR_BYTES: usize = 256 * 1024;

/// Deepest nesting accepted: flow collections plus block indentation levels. SOL001
/// descriptors nest about 8 deep (`topology_template.node_templates.X.capabilities.
/// virtual_compute.properties.virtual_memory.virtual_mem_size`).
pub const MAX_DESCRIPTOR_DEPTH: usize = 32;

/// A descriptor refused before parsing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// More than [`MAX_DESCRIPTOR_BYTES`].
    #[error("{len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The text's length in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Nested deeper than [`MAX_DESCRIPTOR_DEPTH`].
    #[error("nesting deeper than the limit of {max} levels at line {line}")]
    TooDeep {
        /// The limit.
        max: usize,
        /// 1-based line where the limit was crossed.
        line: usize,
    },
}

/// Checks `text` against [`MAX_DESCRIPTOR_BYTES`] and [`MAX_DESCRIPTOR_DEPTH`] in one
/// linear pass, without parsing it. Every `validate_*` runs this first.
pub fn check_limits(text: &str) -> Result<(), LimitError> {
    if text.len() > MAX_DESCRIPTOR_BYTES {
        return Err(LimitError::TooLarge {
            len: text.len(),
            max: MAX_DESCRIPTOR_BYTES,
        });
    }
    check_depth(text, MAX_DESCRIPTOR_DEPTH)
}

/// Lexer state carried from line to line.
#[derive(Debug, Default)]
struct Scan {
    /// Open flow collections (`[`, `{`).
    flow: usize,
    /// The quote character of a quoted scalar still open at the end of a line.
    quote: Option<u8>,
    /// Indentation columns of the open block collections, innermost last.
    indents: Vec<usize>,
    /// Inside a block scalar opened on a line with this indentation: lines indented
    /// deeper (and blank lines) are its text.
    block_scalar: Option<usize>,
}

fn check_depth(text: &str, max: usize) -> Result<(), LimitError> {
    let mut s = Scan::default();
    for (n, line) in text.split('\n').enumerate() {
        let line = line.as_bytes();
        let too_deep = LimitError::TooDeep { max, line: n + 1 };
        let indent = line.iter().take_while(|&&b| b == b' ').count();
        let blank = line[indent..].iter().all(u8::is_ascii_whitespace);
        if let Some(parent) = s.block_scalar {
            if blank || indent > parent {
                continue;
            }
            s.block_scalar = None;
        }
        let mut i = indent;
        // Indentation means structure only outside flow collections and quoted scalars.
        if s.flow == 0 && s.quote.is_none() {
            if blank || line[indent] == b'#' {
                continue;
            }
            while s.indents.last().is_some_and(|&top| top > indent) {
                s.indents.pop();
            }
            if s.indents.last() != Some(&indent) {
                s.indents.push(indent);
            }
            // `- - - x` and `? x` nest on one line: each indicator opens a level at the
            // column of what follows it.
            while matches!(line.get(i), Some(b'-' | b'?'))
                && matches!(line.get(i + 1), Some(b' ' | b'\t' | b'\r') | None)
            {
                i += 1;
                while matches!(line.get(i), Some(b' ' | b'\t')) {
                    i += 1;
                }
                if i < line.len() && s.indents.last().is_some_and(|&top| top < i) {
                    s.indents.push(i);
                }
            }
            if s.indents.len() > max {
                return Err(too_deep);
            }
        }
        // What came before the current byte on this line, for the rules that depend on
        // it: `#` starts a comment and a quote starts a scalar only at a token boundary.
        let mut prev = b' ';
        let mut before_prev = b' ';
        // The last byte of the previous token: a block scalar header must follow an
        // indicator (`key: |`, `- |`), not a plain scalar (`a: b |` is text).
        let mut last_token = line[..i]
            .iter()
            .rev()
            .find(|b| !b.is_ascii_whitespace())
            .copied();
        while i < line.len() {
            let c = line[i];
            match s.quote {
                Some(b'"') => {
                    if c == b'\\' {
                        // The escaped byte is text, whatever it is.
                        i += 2;
                        prev = b'a';
                        continue;
                    }
                    if c == b'"' {
                        s.quote = None;
                    }
                }
                Some(_) => {
                    if c == b'\'' {
                        if line.get(i + 1) == Some(&b'\'') {
                            i += 2;
                            prev = b'a';
                            continue;
                        }
                        s.quote = None;
                    }
                }
                None => match c {
                    b'#' if prev == b' ' || prev == b'\t' => break,
                    b'"' | b'\'' if quote_may_start(prev, before_prev, s.flow) => {
                        s.quote = Some(c);
                    }
                    b'[' | b'{' => {
                        s.flow += 1;
                        if s.flow + s.indents.len() > max {
                            return Err(too_deep);
                        }
                    }
                    b']' | b'}' => s.flow = s.flow.saturating_sub(1),
                    b'|' | b'>'
                        if s.flow == 0
                            && matches!(prev, b' ' | b'\t')
                            && matches!(last_token, Some(b':' | b'-' | b'?'))
                            && block_header_ends(&line[i + 1..]) =>
                    {
                        // Its text is indented deeper than the node holding it; taking
                        // the deeper of the line's and the innermost level's columns
                        // ends the skip too early rather than too late.
                        let parent = s.indents.last().map_or(indent, |&top| top.max(indent));
                        s.block_scalar = Some(parent);
                        break;
                    }
                    _ => {}
                },
            }
            if !c.is_ascii_whitespace() {
                last_token = Some(c);
            }
            before_prev = prev;
            prev = c;
            i += 1;
        }
    }
    Ok(())
}

/// Whether a quote after `prev` (and `before_prev`) opens a quoted scalar: at a token
/// boundary, or right after the `:` of a JSON-like key inside a flow collection
/// (`{"a":"b"}`). Elsewhere (`it's`, `a:"b"`) it is part of a plain scalar.
fn quote_may_start(prev: u8, before_prev: u8, flow: usize) -> bool {
    match prev {
        b' ' | b'\t' | b'[' | b'{' | b',' => true,
        b':' => flow > 0 && matches!(before_prev, b'"' | b'\'' | b']' | b'}'),
        _ => false,
    }
}

/// Whether `rest`, after a `|` or `>`, is a block scalar header's remainder: chomping
/// and indentation indicators, then nothing or a comment.
fn block_header_ends(rest: &[u8]) -> bool {
    let ind = rest
        .iter()
        .take_while(|b| matches!(b, b'-' | b'+' | b'1'..=b'9'))
        .count();
    let tail = &rest[ind..];
    let ws = tail
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\r'))
        .count();
    ws == tail.len() || (ws > 0 && tail[ws] == b'#')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn depth_err(text: &str) -> Option<usize> {
        match check_depth(text, MAX_DESCRIPTOR_DEPTH) {
            Ok(()) => None,
            Err(LimitError::TooDeep { line, .. }) => Some(line),
            Err(e) => panic!("{e}"),
        }
    }

    fn block_map(depth: usize) -> String {
        (0..depth)
            .map(|d| format!("{}k{d}:\n", "  ".repeat(d)))
            .collect()
    }

    #[test]
    fn size_is_checked_first() {
        let text = "[".repeat(1_900_000);
        assert_eq!(
            check_limits(&text).unwrap_err().to_string(),
            "1900000 bytes exceeds the limit of 262144 bytes"
        );
        assert!(check_limits(&"a".repeat(MAX_DESCRIPTOR_BYTES)).is_ok());
    }

    #[test]
    fn flow_nesting_is_counted() {
        // The document's own level counts: 1 + 31 brackets is the limit.
        assert_eq!(depth_err(&"[".repeat(31)), None);
        assert_eq!(depth_err(&"[".repeat(32)), Some(1));
        assert_eq!(depth_err(&"{a: ".repeat(40)), Some(1));
        // Flow collections spanning lines keep their depth.
        assert_eq!(depth_err(&"[\n".repeat(40)), Some(32));
        // Closed brackets give their level back.
        assert_eq!(depth_err(&"[[]]".repeat(1000)), None);
        // Inside a block mapping both count.
        let text = format!("{}{}x: {}", block_map(20), "  ".repeat(20), "[".repeat(12));
        assert_eq!(depth_err(&text), Some(21));
    }

    #[test]
    fn block_nesting_is_counted() {
        assert_eq!(depth_err(&block_map(32)), None);
        assert_eq!(depth_err(&block_map(33)), Some(33));
        assert_eq!(depth_err(&"- ".repeat(33)), Some(1));
        assert_eq!(depth_err(&format!("{}x", "- ".repeat(31))), None);
        // Dedenting gives levels back.
        let text = format!("{}top:\n", block_map(30)).repeat(20);
        assert_eq!(depth_err(&text), None);
    }

    #[test]
    fn text_does_not_count() {
        let deep = "[".repeat(100);
        for text in [
            format!("a: \"{deep}\"\n"),
            format!("a: '{deep}'\n"),
            format!("a: 1 # {deep}\n"),
            format!("# {deep}\n"),
            format!("a: \"x\\\"{deep}\"\n"),
            format!("a: 'it''s {deep}'\n"),
            format!("a: |\n  {deep}\n    {deep}\n\n  x\nb: 1\n"),
            format!("a: >-\n  {deep}\nb: 1\n"),
            format!("a: \"multi\n  line {deep}\n  \"\nb: 1\n"),
            format!("a: {{\"k\":\"{deep}\"}}\n"),
        ] {
            assert_eq!(depth_err(&text), None, "{text}");
        }
    }

    #[test]
    fn text_cannot_hide_nesting() {
        // Quotes inside plain scalars do not open a quoted scalar.
        for text in [
            format!("a: it's {}\n", "[".repeat(40)),
            format!("[a:\"{}\n", "[".repeat(40)),
            // A closer inside a string does not close anything.
            "[ \"]\" ".repeat(40),
            // `|` inside a value is not a block scalar.
            format!("a: b |\n{}", "[".repeat(40)),
            // A block scalar ends at the first line not indented deeper.
            format!("a: |\n  x\n{}\n", "[".repeat(40)),
        ] {
            assert!(depth_err(&text).is_some(), "{text}");
        }
    }
}
