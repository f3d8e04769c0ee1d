//! Fuzzes the reward parser: any input scores without panicking, and the invariants of
//! EasyR1's img_score hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use spatial_ssrl::reward::{extract_boxed, format_ok, normalize_whitespace, score, RewardConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (response, answer) = text.split_once('\u{0}').unwrap_or((text, "A"));
    let s = score(response, answer, &RewardConfig::default());
    assert!([0.0, 0.1, 0.9, 1.0].iter().any(|v| (s.overall - v).abs() < 1e-12), "{s:?}");
    let n = normalize_whitespace(response);
    assert_eq!(normalize_whitespace(&n), n, "normalisation is idempotent");
    let p = extract_boxed(&n);
    assert!(p == "None" || n.contains(&p), "prediction comes from the text");
    if format_ok(&n) {
        assert!(n.starts_with("<think>") && n.contains("</think>") && n.contains("\\boxed{"));
    }
    assert_eq!(s.accuracy == 1.0, s.predicted == answer);
});
