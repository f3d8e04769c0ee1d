//! Prompts as the trainer sees them: EasyR1's assembly (problem, one space, the format sentence,
//! split on `<image>` into image and text parts), the package's chat template rendered with
//! minijinja, each image placeholder (`<|image_pad|>`, the family's) expanded to the image's
//! token count, then tokenized.

use super::family::Family;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    #[error("{}: cannot load the tokenizer", path.display())]
    LoadTokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("{}: not valid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: no chat_template in chat_template.json or tokenizer_config.json", .0.display())]
    NoTemplate(PathBuf),
    #[error("chat template")]
    Template(#[source] minijinja::Error),
    #[error("tokenizer")]
    Tokenizer(#[source] tokenizers::Error),
    #[error("the tokenizer has no token {0}")]
    NoToken(String),
    #[error("the prompt has {placeholders} image placeholders but {images} images were given")]
    ImageCount { placeholders: usize, images: usize },
}

pub struct PromptBuilder {
    tokenizer: tokenizers::Tokenizer,
    template: String,
    image_pad: String,
}

/// EasyR1's placeholder in `problem` texts.
pub const IMAGE_PLACEHOLDER: &str = "<image>";

impl PromptBuilder {
    /// Reads `tokenizer.json` and the chat template (`chat_template.json`, else
    /// `tokenizer_config.json`) from a package folder of `family`.
    pub fn from_dir(dir: &Path, family: Family) -> Result<PromptBuilder, PromptError> {
        let tp = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tp)
            .map_err(|source| PromptError::LoadTokenizer { path: tp, source })?;
        let mut template = None;
        for f in ["chat_template.json", "tokenizer_config.json"] {
            let p = dir.join(f);
            if let Ok(text) = std::fs::read_to_string(&p) {
                let v: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|source| PromptError::Json { path: p, source })?;
                if let Some(t) = v.get("chat_template").and_then(|t| t.as_str()) {
                    template = Some(t.to_string());
                    break;
                }
            }
        }
        let template = template.ok_or_else(|| PromptError::NoTemplate(dir.to_path_buf()))?;
        Ok(PromptBuilder {
            tokenizer,
            template,
            image_pad: family.spec().image_pad.into(),
        })
    }

    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.tokenizer
    }

    /// The user turn of EasyR1: `problem.trim()` + (" " + format sentence), split on `<image>`.
    pub fn content(problem: &str, format_sentence: Option<&str>) -> serde_json::Value {
        let text = match format_sentence {
            Some(f) => format!("{} {f}", problem.trim()),
            None => problem.trim().to_string(),
        };
        Self::verbatim(&text)
    }

    /// The user turn exactly as given (benchmark prompts are byte-exact), split on `<image>`.
    pub fn verbatim(text: &str) -> serde_json::Value {
        let mut parts = Vec::new();
        for (i, seg) in text.split(IMAGE_PLACEHOLDER).enumerate() {
            if i > 0 {
                parts.push(serde_json::json!({"type": "image"}));
            }
            if !seg.is_empty() {
                parts.push(serde_json::json!({"type": "text", "text": seg}));
            }
        }
        serde_json::json!([{"role": "user", "content": parts}])
    }

    /// Renders the chat template for `messages` with the generation prompt.
    pub fn render(&self, messages: &serde_json::Value) -> Result<String, PromptError> {
        let mut env = minijinja::Environment::new();
        env.set_keep_trailing_newline(true);
        env.add_template("chat", &self.template)
            .map_err(PromptError::Template)?;
        let t = env.get_template("chat").map_err(PromptError::Template)?;
        t.render(minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => true,
            add_vision_id => false,
        })
        .map_err(PromptError::Template)
    }

    /// Expands each `<|image_pad|>` to `tokens[i]` copies (in order) and tokenizes. The text
    /// between the placeholders is tokenized piece by piece and the pad ids spliced in: the
    /// same ids as tokenizing the expanded text (the tokenizer splits its text at special
    /// tokens first and encodes the pieces independently), without matching hundreds of pads;
    /// offsets are not tracked.
    pub fn encode(&self, rendered: &str, image_tokens: &[usize]) -> Result<Vec<u32>, PromptError> {
        let parts: Vec<&str> = rendered.split(self.image_pad.as_str()).collect();
        if parts.len() - 1 != image_tokens.len() {
            return Err(PromptError::ImageCount {
                placeholders: parts.len() - 1,
                images: image_tokens.len(),
            });
        }
        let pad = self
            .tokenizer
            .token_to_id(&self.image_pad)
            .ok_or_else(|| PromptError::NoToken(self.image_pad.clone()))?;
        let mut ids = Vec::with_capacity(image_tokens.iter().sum::<usize>() + rendered.len() / 2);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                ids.extend(std::iter::repeat_n(pad, image_tokens[i - 1]));
            }
            if !part.is_empty() {
                let enc = self
                    .tokenizer
                    .encode_fast(*part, false)
                    .map_err(PromptError::Tokenizer)?;
                ids.extend_from_slice(enc.get_ids());
            }
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, PromptError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(PromptError::Tokenizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chat template that does not parse is reported with minijinja's own error as the
    /// cause, so the report names what is wrong and where.
    #[test]
    fn template_errors_keep_their_cause() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let mut p = PromptBuilder::from_dir(&dir, Family::QWEN2_5_VL).unwrap();
        p.template = "{% for m in messages %}{{ m.role }".into();
        let e = p.render(&PromptBuilder::verbatim("hi")).unwrap_err();
        let cause = std::error::Error::source(&e).expect("minijinja's error as the source");
        assert!(cause.to_string().contains("syntax error"), "{cause}");
        let chain = crate::error_chain(&e);
        assert!(
            chain.starts_with("chat template: ") && chain.contains("syntax error"),
            "{chain}"
        );
        let missing = PromptBuilder::from_dir(&dir.join("hf/nothing"), Family::QWEN2_5_VL)
            .err()
            .expect("no tokenizer there");
        assert!(std::error::Error::source(&missing).is_some(), "{missing}");
    }

    /// Spliced pad ids equal tokenizing the expanded text in one piece, for rendered prompts
    /// with zero, one and several images and placeholders against spaces, newlines, digits
    /// and non-ASCII text.
    #[test]
    fn spliced_pads_equal_tokenizing_the_expanded_text() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/tiny");
        let p = PromptBuilder::from_dir(&dir, Family::QWEN2_5_VL).unwrap();
        let problems = [
            "How many chairs are there?",
            "<image>Which region is closer, A or B?",
            "Compare <image> and <image>: which one was flipped? 12 patches.",
            "<image>\n  <image>größer — 距离 <image>3",
        ];
        for (k, problem) in problems.iter().enumerate() {
            let rendered = p.render(&PromptBuilder::content(problem, None)).unwrap();
            let n = rendered.matches("<|image_pad|>").count();
            assert_eq!(n, problem.matches("<image>").count());
            let counts: Vec<usize> = (0..n).map(|i| 4 * (i + k + 1)).collect();
            let mut text = String::new();
            for (i, part) in rendered.split("<|image_pad|>").enumerate() {
                if i > 0 {
                    text.push_str(&"<|image_pad|>".repeat(counts[i - 1]));
                }
                text.push_str(part);
            }
            let whole = p.tokenizer.encode(text, false).unwrap().get_ids().to_vec();
            assert_eq!(p.encode(&rendered, &counts).unwrap(), whole, "{problem}");
        }
        let rendered = p.render(&PromptBuilder::content("<image>x", None)).unwrap();
        assert!(matches!(
            p.encode(&rendered, &[]),
            Err(PromptError::ImageCount {
                placeholders: 1,
                images: 0
            })
        ));
    }
}
