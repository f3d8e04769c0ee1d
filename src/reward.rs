//! The verifiable reward, exactly as EasyR1's `img_score` computes it
//! (`examples/reward_function/math.py`, with `mathruler.grader.extract_boxed_content`):
//!
//! 1. delete whitespace on both sides of every `<`, `>` and `/` (`re.sub(r"\s*(<|>|/)\s*", r"\1", …)`);
//! 2. format = 1 if the text fully matches `<think>.*</think>.*\boxed\{.*\}.*` (dot matches newlines);
//! 3. prediction = the contents of the **last** `\boxed{`, brace-matched and stripped, or `"None"`;
//! 4. accuracy = 1 if the prediction equals the answer exactly;
//! 5. overall = (1 − w)·accuracy + w·format, w = 0.1.

use serde::{Deserialize, Serialize};

/// Python's `str.isspace()` (what `\s` and `str.strip()` use): Unicode White_Space plus the
/// ASCII separators U+001C–U+001F.
pub fn py_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

fn is_special(c: char) -> bool {
    matches!(c, '<' | '>' | '/')
}

/// `re.sub(r"\s*(<|>|/)\s*", r"\1", text)`: every whitespace run touching `<`, `>` or `/`
/// is removed.
pub fn normalize_whitespace(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        if py_isspace(chars[i]) {
            let start = i;
            while i < chars.len() && py_isspace(chars[i]) {
                i += 1;
            }
            let before = start > 0 && is_special(chars[start - 1]);
            let after = i < chars.len() && is_special(chars[i]);
            if !(before || after) {
                out.extend(&chars[start..i]);
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// `re.fullmatch(r"<think>.*</think>.*\\boxed\{.*\}.*", text, re.DOTALL)` on normalised text.
pub fn format_ok(text: &str) -> bool {
    let Some(rest) = text.strip_prefix("<think>") else {
        return false;
    };
    let Some(i) = rest.find("</think>") else {
        return false;
    };
    let rest = &rest[i + "</think>".len()..];
    let Some(j) = rest.find("\\boxed{") else {
        return false;
    };
    rest[j + "\\boxed{".len()..].contains('}')
}

/// `mathruler.grader.extract_boxed_content`: the last `\boxed{…}` with brace matching,
/// stripped; `"None"` when there is no box or it never closes.
pub fn extract_boxed(text: &str) -> String {
    let Some(start) = text.rfind("\\boxed{") else {
        return "None".into();
    };
    let content = &text[start + "\\boxed{".len()..];
    let mut depth = 0i64;
    for (i, c) in content.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            _ => {}
        }
        if depth == -1 {
            return content[..i].trim_matches(py_isspace).to_string();
        }
    }
    "None".into()
}

/// Reward weights.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardConfig {
    /// Weight of the format score in `overall` (EasyR1's `format_weight`).
    pub format_weight: f64,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig { format_weight: 0.1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub overall: f64,
    pub format: f64,
    pub accuracy: f64,
    pub predicted: String,
}

/// Whether a response is in the reasoning format, as [`score`] checks it (whitespace
/// normalised first).
pub fn in_format(response: &str) -> bool {
    format_ok(&normalize_whitespace(response))
}

/// Scores one response against its ground-truth answer.
pub fn score(response: &str, answer: &str, cfg: &RewardConfig) -> Score {
    let r = normalize_whitespace(response);
    let format = if format_ok(&r) { 1.0 } else { 0.0 };
    let predicted = extract_boxed(&r);
    let accuracy = if predicted == answer { 1.0 } else { 0.0 };
    Score {
        overall: (1.0 - cfg.format_weight) * accuracy + cfg.format_weight * format,
        format,
        accuracy,
        predicted,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(r: &str, a: &str) -> (f64, f64, f64, String) {
        let x = score(r, a, &RewardConfig::default());
        (x.overall, x.format, x.accuracy, x.predicted)
    }

    #[test]
    fn paper_examples() {
        let r = "<think>The patch labelled 0 continues the sky.</think> The answer is \\boxed{0-2-3-1}.";
        assert_eq!(s(r, "0-2-3-1"), (1.0, 1.0, 1.0, "0-2-3-1".into()));
        assert_eq!(s(r, "1-2-0-3").0, 0.1);
        // Right answer, no think block: 0.9.
        let x = s("\\boxed{C}", "C");
        assert!((x.0 - 0.9).abs() < 1e-12 && x.1 == 0.0 && x.2 == 1.0);
        // Nothing: 0.
        assert_eq!(s("I think it is C", "C"), (0.0, 0.0, 0.0, "None".into()));
    }

    #[test]
    fn whitespace_around_tags_and_slashes() {
        assert_eq!(
            normalize_whitespace("  < think >a b</ think >\n x / y"),
            "<think>a b</think>x/y"
        );
        assert_eq!(normalize_whitespace("a  b\tc"), "a  b\tc");
        // Leading whitespace before <think> is removed, so the format still matches.
        assert_eq!(s("\n  <think> hm </think>\n\\boxed{ A }", "A").1, 1.0);
        // Whitespace inside the box is stripped (Python str.strip).
        assert_eq!(s("<think>x</think>\\boxed{ A }", "A").2, 1.0);
        // U+001F counts as whitespace for Python.
        assert_eq!(normalize_whitespace("a\u{1f}/b"), "a/b");
    }

    #[test]
    fn tricky_boxes() {
        // The last box wins.
        assert_eq!(extract_boxed("\\boxed{A} then \\boxed{B}"), "B");
        // Nested braces are matched.
        assert_eq!(extract_boxed("\\boxed{\\frac{1}{2}}"), "\\frac{1}{2}");
        // An unclosed last box gives "None" even if an earlier box closed.
        assert_eq!(extract_boxed("\\boxed{A} \\boxed{B"), "None");
        // No case folding, no option text.
        assert_eq!(s("<think>.</think>\\boxed{a}", "A").2, 0.0);
        assert_eq!(s("<think>.</think>\\boxed{A. Left}", "A").2, 0.0);
        // Format needs <think> first, </think> before the box, and a closing brace.
        assert_eq!(s("x<think>.</think>\\boxed{A}", "A").1, 0.0);
        assert_eq!(s("<think>.\\boxed{A}</think>", "A").1, 0.0);
        assert_eq!(s("<think></think>\\boxed{", "A").1, 0.0);
        // `.*` spans newlines; `/` whitespace removal also touches the answer text.
        assert_eq!(
            s("<think>a\nb</think>\n\\boxed{1 / 2}", "1/2"),
            (1.0, 1.0, 1.0, "1/2".into())
        );
        // "<think>" must not overlap "</think>".
        assert!(!format_ok("<think>/think>\\boxed{}"));
        assert!(format_ok("<think></think>\\boxed{}"));
    }

    #[test]
    fn weights_are_configurable() {
        let c = RewardConfig { format_weight: 0.5 };
        let x = score("<think>.</think>\\boxed{B}", "A", &c);
        assert_eq!(x.overall, 0.5);
    }
}
