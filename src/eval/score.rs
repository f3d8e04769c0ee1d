//! Answer extraction and scoring, rule for rule as each benchmark's official evaluation code
//! does it, quirks included (they move the numbers, and the numbers are compared with papers).
//!
//! - ViewSpatial-Bench: the first standalone `A`–`D` (case-insensitive, so the article "a"
//!   counts) in the last `\boxed{…}` (reasoning runs) or in the raw response.
//! - What'sUp: the correct caption is always option A and a response scores if the text
//!   *contains* an `A` (the official substring rule; "Answer: B" scores). The strict variant asks
//!   for the first standalone letter to be `A`.
//! - VSI-Bench: a one-letter prediction is compared case-insensitively; anything else is scored
//!   by mean relative accuracy over θ ∈ {0.50, 0.55, …, 0.95}.
//! - VLMEvalKit multiple choice: `can_infer` (a lone option letter among the words, else a
//!   unique option text contained in the response), `Z` when nothing is inferred.

/// The contents of every `boxed{…}` without nested braces, as `re.findall(r"boxed\{([^}]*)\}")`
/// finds them; with `backslash` the pattern is `\\boxed\{([^}]*)\}`.
fn boxed_matches(text: &str, backslash: bool) -> Vec<&str> {
    let pat = if backslash { "\\boxed{" } else { "boxed{" };
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(i) = text[at..].find(pat) {
        let start = at + i + pat.len();
        match text[start..].find('}') {
            // `[^}]*` may contain `{`: "\boxed{a{b}" matches with "a{b".
            Some(j) => {
                out.push(&text[start..start + j]);
                at = start + j + 1;
            }
            None => break,
        }
    }
    out
}

/// The last `\boxed{…}` content (`''` when there is none), as ViewSpatial and VSI-Bench extract.
pub fn last_boxed(text: &str) -> &str {
    boxed_matches(text, true).last().copied().unwrap_or("")
}

/// What'sUp's variant of the same pattern, without the backslash.
pub fn last_boxed_loose(text: &str) -> &str {
    boxed_matches(text, false).last().copied().unwrap_or("")
}

use super::pyunicode::{self, is_word};

/// `re.search(r"\b([A-D])\b", text, re.IGNORECASE)`, upper-cased.
pub fn first_standalone_letter(text: &str, last: char) -> Option<char> {
    let chars: Vec<char> = text.chars().collect();
    (0..chars.len()).find_map(|i| {
        let c = chars[i].to_ascii_uppercase();
        let standalone = ('A'..=last).contains(&c)
            && (i == 0 || !is_word(chars[i - 1]))
            && chars.get(i + 1).is_none_or(|&n| !is_word(n));
        standalone.then_some(c)
    })
}

/// A scored response: what was extracted, the score in [0, 1], and the strict variant's verdict
/// where a benchmark has one.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub predicted: String,
    pub score: f64,
    pub strict: Option<bool>,
}

fn hit(predicted: String, ok: bool) -> Scored {
    Scored {
        predicted,
        score: f64::from(u8::from(ok)),
        strict: None,
    }
}

/// ViewSpatial-Bench: the prediction's letter against the letter of the answer ("A. right").
pub fn viewspatial(response: &str, answer: &str, reasoning: bool) -> Scored {
    let text = if reasoning {
        last_boxed(response)
    } else {
        response
    };
    let pred = first_standalone_letter(text, 'D');
    let want = first_standalone_letter(answer, 'D');
    hit(
        pred.map(String::from).unwrap_or_default(),
        pred.is_some() && pred == want,
    )
}

/// What'sUp: the official substring rule, and the strict variant.
pub fn whatsup(response: &str, label: char, reasoning: bool) -> Scored {
    let text = if reasoning {
        last_boxed_loose(response)
    } else {
        response
    };
    let strict = first_standalone_letter(text, 'D') == Some(label);
    Scored {
        predicted: text.to_string(),
        score: f64::from(u8::from(text.contains(label))),
        strict: Some(strict),
    }
}

/// Python's `float()` on a string (see [`pyunicode::float`]).
fn py_float(s: &str) -> Option<f64> {
    pyunicode::float(s)
}

/// Mean relative accuracy: the share of θ ∈ {0.50, 0.55, …, 0.95} with `|ŷ−y|/y < 1−θ`, the
/// thresholds computed as the official code does (`0.5 + i·0.05` in doubles). Anything that is
/// not a number, or `y = 0`, scores 0.
pub fn mra(pred: &str, answer: &str) -> f64 {
    let (Some(p), Some(y)) = (py_float(pred), py_float(answer)) else {
        return 0.0;
    };
    if y == 0.0 {
        return 0.0; // ZeroDivisionError in the official code.
    }
    let rel = (p - y).abs() / y;
    let hits = (0..20)
        .filter(|&i| rel < 1.0 - (0.5 + f64::from(i) * 0.05))
        .count();
    hits as f64 / 10.0
}

/// VSI-Bench: `pred` is the response after Python's `.strip()` (which also takes U+001C–U+001F),
/// or its last `\boxed{}` in reasoning runs; one letter (Python's `isalpha`) is compared
/// case-insensitively, anything else by [`mra`].
pub fn vsi(response: &str, answer: &str, reasoning: bool) -> Scored {
    let response = pyunicode::strip(response);
    let pred = if reasoning {
        last_boxed(response)
    } else {
        response
    };
    let mut chars = pred.chars();
    let score = match (chars.next(), chars.next()) {
        (Some(c), None) if pyunicode::is_alpha(c) => {
            f64::from(u8::from(pred.to_lowercase() == answer.to_lowercase()))
        }
        _ => mra(pred, answer),
    };
    Scored {
        predicted: pred.to_string(),
        score,
        strict: None,
    }
}

const REJECTIONS: [&str; 4] = [
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
];

/// VLMEvalKit `can_infer_option`: the one option letter standing alone among the words once
/// `.()[],:;!*#{}` are spaces; `Z` for a refusal; `None` when zero or several letters stand.
fn infer_option(answer: &str, choices: &[(char, String)]) -> Option<char> {
    if answer.contains("Failed to obtain answer via API") {
        return None;
    }
    if REJECTIONS.iter().any(|r| answer.contains(r)) {
        return Some('Z');
    }
    let cleaned: String = answer
        .chars()
        .map(|c| if ".()[],:;!*#{}".contains(c) { ' ' } else { c })
        .collect();
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    let standing: Vec<char> = choices
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| words.iter().any(|w| w.len() == 1 && w.starts_with(*k)))
        .collect();
    match standing.as_slice() {
        [one] => Some(*one),
        [] if words.contains(&"Z") => Some('Z'),
        _ => None,
    }
}

/// VLMEvalKit `can_infer_text`: the one option whose text (lower-cased) the response contains.
fn infer_text(answer: &str, choices: &[(char, String)]) -> Option<char> {
    let answer = answer.to_lowercase();
    let found: Vec<char> = choices
        .iter()
        .filter(|(_, text)| answer.contains(&text.to_lowercase()))
        .map(|(k, _)| *k)
        .collect();
    match found.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// VLMEvalKit `can_infer` under exact matching: the inferred letter, `Z` when nothing is.
pub fn can_infer(answer: &str, choices: &[(char, String)]) -> char {
    infer_option(answer, choices)
        .or_else(|| infer_text(answer, choices))
        .unwrap_or('Z')
}

/// VLMEvalKit multiple choice as its exact-matching path scores it: `can_infer` on the whole
/// response. (Taking the last `boxed{…}` first is `image_vqa.py`'s rule for free-form datasets,
/// not this one's: `\boxed{A}\boxed{B}` and `I think A. \boxed{B}` infer nothing, `I boxed the
/// answer: B` infers B.)
pub fn multiple_choice(response: &str, answer: &str, choices: &[(char, String)]) -> Scored {
    // VLMEvalKit keeps predictions in an Excel file: an empty one comes back as NaN and is
    // scored as the text "nan" (which an option text such as "a" or "an" is contained in).
    let response = if response.is_empty() { "nan" } else { response };
    let letter = can_infer(response, choices);
    let gt = answer.trim();
    hit(letter.to_string(), gt.len() == 1 && gt.starts_with(letter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxed_follows_the_regex() {
        assert_eq!(last_boxed("\\boxed{A} then \\boxed{ 3.5 }"), " 3.5 ");
        assert_eq!(last_boxed("no box"), "");
        // `[^}]*` stops at the first closing brace, nested opening braces included.
        assert_eq!(last_boxed("\\boxed{\\text{B}}"), "\\text{B");
        // An unclosed box is no match; the earlier one stands.
        assert_eq!(last_boxed("\\boxed{C} \\boxed{D"), "C");
        // Without the backslash only the loose pattern matches.
        assert_eq!(last_boxed("boxed{B}"), "");
        assert_eq!(last_boxed_loose("boxed{B}"), "B");
    }

    #[test]
    fn standalone_letters_follow_python_word_boundaries() {
        assert_eq!(first_standalone_letter("The answer is B.", 'D'), Some('B'));
        // Case-insensitive: the article "a" is a standalone A.
        assert_eq!(first_standalone_letter("It is a chair, C", 'D'), Some('A'));
        assert_eq!(first_standalone_letter("Back-left", 'D'), None);
        assert_eq!(first_standalone_letter("(d)", 'D'), Some('D'));
        assert_eq!(first_standalone_letter("E", 'D'), None);
        assert_eq!(first_standalone_letter("B_2 or Bé", 'D'), None);
    }

    #[test]
    fn viewspatial_edge_cases() {
        // Reasoning runs read the last box only; no box is no answer.
        assert_eq!(
            viewspatial("<think>A? no.</think>\\boxed{B. left}", "B. left", true).score,
            1.0
        );
        assert_eq!(viewspatial("The answer is B", "B. left", true).score, 0.0);
        // Direct runs read the raw text: the article "a" is taken for option A.
        let r = viewspatial("It is a left turn: B", "B. left", false);
        assert_eq!((r.predicted.as_str(), r.score), ("A", 0.0));
        assert_eq!(viewspatial("b", "B. left", false).score, 1.0);
    }

    #[test]
    fn whatsup_substring_rule_and_strict_variant() {
        // Any capital A counts under the official rule: "Answer: B" scores, strict does not.
        let r = whatsup("Answer: B", 'A', false);
        assert_eq!((r.score, r.strict), (1.0, Some(false)));
        let r = whatsup("A", 'A', false);
        assert_eq!((r.score, r.strict), (1.0, Some(true)));
        // Lower-case "a" is not the substring "A".
        assert_eq!(whatsup("b", 'A', false).score, 0.0);
        // Reasoning: the last box, matched without the backslash.
        let r = whatsup(
            "<think>A or B</think> boxed{B: A cup under a saucer}",
            'A',
            true,
        );
        assert_eq!((r.score, r.strict), (1.0, Some(false)));
        assert_eq!(whatsup("<think>A</think> no box", 'A', true).score, 0.0);
    }

    #[test]
    fn mean_relative_accuracy_thresholds() {
        assert_eq!(mra("3.0", "3"), 1.0);
        assert_eq!(mra(" 3 ", "3"), 1.0);
        // 7 % off: θ = 0.50 … 0.90 pass (1−θ > 0.07), 0.95 fails.
        assert!((mra("10.7", "10") - 0.9).abs() < 1e-12);
        // Exactly 50 % off passes no threshold (strict <).
        assert_eq!(mra("15", "10"), 0.0);
        assert!((mra("14.9", "10") - 0.1).abs() < 1e-12);
        // Not a number, or a zero answer (ZeroDivisionError upstream), scores 0.
        assert_eq!(mra("about 3", "3"), 0.0);
        assert_eq!(mra("", "3"), 0.0);
        assert_eq!(mra("0", "0"), 0.0);
        assert_eq!(mra("nan", "3"), 0.0);
        assert_eq!(mra("1e1", "10"), 1.0);
    }

    #[test]
    fn vsi_letters_and_numbers() {
        assert_eq!(vsi("b", "B", false).score, 1.0);
        // "B." is not one letter, so it goes to MRA and fails.
        assert_eq!(vsi("B.", "B", false).score, 0.0);
        assert_eq!(vsi("  4\n", "4", false).score, 1.0);
        assert_eq!(
            vsi("<think>count</think>\\boxed{ 4 }", "4", true).score,
            1.0
        );
        assert_eq!(vsi("4", "4", true).score, 0.0);
        let r = vsi("\\boxed{4.4}", "4", true);
        assert!((r.score - 0.8).abs() < 1e-12, "{r:?}");
    }

    fn abcd() -> Vec<(char, String)> {
        ["dog", "cat", "bird", "horse"]
            .iter()
            .zip('A'..)
            .map(|(t, l)| (l, t.to_string()))
            .collect()
    }

    #[test]
    fn vlmevalkit_can_infer() {
        let c = abcd();
        assert_eq!(can_infer("B", &c), 'B');
        assert_eq!(can_infer("The answer is (B).", &c), 'B');
        // Two letters standing: fall back to option text, unique "cat".
        assert_eq!(can_infer("A or B, it is a cat", &c), 'B');
        // "?" is not one of the separators: "B?" is no letter, so the lone "A" wins.
        assert_eq!(can_infer("A or B? It is a cat", &c), 'A');
        // "A" as an article is a standing letter (the known quirk).
        assert_eq!(can_infer("A cat", &c), 'A');
        assert_eq!(can_infer("Cannot determine the answer", &c), 'Z');
        assert_eq!(can_infer("no idea", &c), 'Z');
        // Option text must be unique: "cat" and "dog" both appear.
        assert_eq!(can_infer("a cat and a dog", &c), 'Z');
        // The official exact-matching path: `can_infer` on the whole response, no boxed
        // extraction (A and B both stand here, and no option text is named).
        let r = multiple_choice("<think>Maybe A, maybe B.</think>\\boxed{B}", "B", &c);
        assert_eq!((r.predicted.as_str(), r.score, r.strict), ("Z", 0.0, None));
        for (response, letter) in [
            ("\\boxed{A}\\boxed{B}", 'Z'),
            ("I think A. \\boxed{B}", 'Z'),
            ("I boxed the answer: B", 'B'),
            ("\\boxed{B}", 'B'),
            ("<think>It is a bird.</think> \\boxed{C}", 'C'),
        ] {
            let r = multiple_choice(response, "B", &c);
            assert_eq!(r.predicted, letter.to_string(), "{response}");
            assert_eq!(r.score, f64::from(u8::from(letter == 'B')), "{response}");
        }
    }

    /// VSI-Bench takes Python's `strip()` and `float()`: U+001C–U+001F stripped, non-ASCII
    /// digits read, `_` only between digits; a one-character prediction goes to the letter
    /// rule only when Python calls it a letter.
    #[test]
    fn vsi_reads_numbers_as_python() {
        assert_eq!(vsi("\x1c4\x1f", "4", false).score, 1.0);
        assert_eq!(vsi("\u{664}", "4", false).score, 1.0);
        assert_eq!(vsi("\u{ff14}", "4", false).score, 1.0);
        assert_eq!(vsi("4_0", "40", false).score, 1.0);
        assert_eq!(vsi("_40", "40", false).score, 0.0);
        assert_eq!(vsi("40_", "40", false).score, 0.0);
        // Ⅳ is Nl: not a letter to Python, and no number either.
        assert_eq!(vsi("\u{2163}", "\u{2163}", false).score, 0.0);
        assert_eq!(vsi("\u{e9}", "\u{c9}", false).score, 1.0);
    }

    /// ViewSpatial's `\b` is Python's: a combining vowel sign or a circled letter is no word
    /// character, so a letter beside one stands alone.
    #[test]
    fn viewspatial_word_boundaries_are_pythons() {
        assert_eq!(first_standalone_letter("\u{93e}B", 'D'), Some('B'));
        assert_eq!(first_standalone_letter("\u{24b6}C", 'D'), Some('C'));
        assert_eq!(first_standalone_letter("\u{e9}B", 'D'), None);
        assert_eq!(first_standalone_letter("\u{b2}A", 'D'), None);
    }
}
