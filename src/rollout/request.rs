//! What a request becomes before generation: its prompt ids (the package's chat template
//! rendered, EasyR1's format sentence added, image placeholders expanded) and its images'
//! grids, checked against the room the model's context leaves.

use super::types::EngineError;
use crate::kernels::SamplingParams;
use crate::model::processor::{grid_thw, image_tokens, PreprocessorConfig};
use crate::model::prompt::PromptBuilder;
use image::RgbImage;

/// One prompt: EasyR1's `problem` (with `<image>` placeholders) and its images.
#[derive(Debug, Clone)]
pub struct Request {
    /// Keys the random streams: the same id, sample and step draw the same numbers in any batch.
    pub id: u64,
    pub problem: String,
    pub images: Vec<RgbImage>,
}

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub group: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Appended to the problem after one space (EasyR1's format prompt); `None` for none.
    pub format_sentence: Option<String>,
    /// Use each problem as the user text byte for byte: no trimming, no format sentence
    /// (benchmark prompts).
    pub verbatim: bool,
}

/// Prompts ready to generate from: token ids (image placeholders expanded), image grids and
/// vision features, per request.
#[derive(Debug, Clone, Default)]
pub struct Prepared {
    pub prompts: Vec<Vec<u32>>,
    pub grids: Vec<ImageGrids>,
    /// `[image tokens, out_hidden_size]` flattened, per request.
    pub features: Vec<Vec<f32>>,
    /// A DeepStack package's `[K, image tokens, out_hidden_size]` per request (empty
    /// otherwise).
    pub deepstack: Vec<Vec<f32>>,
}

impl Prepared {
    /// The requests at `share`'s indices.
    pub(super) fn pick(&self, share: &[usize]) -> Prepared {
        Prepared {
            prompts: share.iter().map(|&i| self.prompts[i].clone()).collect(),
            grids: share.iter().map(|&i| self.grids[i].clone()).collect(),
            features: share.iter().map(|&i| self.features[i].clone()).collect(),
            deepstack: share
                .iter()
                .map(|&i| self.deepstack.get(i).cloned().unwrap_or_default())
                .collect(),
        }
    }
}

/// How a request's problem becomes the user turn: as it is (`verbatim`), or with the format
/// sentence added; and the room the prompt has: `(context length, new tokens)`, where known.
#[derive(Clone, Copy)]
pub(super) struct PromptText<'a> {
    pub(super) format_sentence: Option<&'a str>,
    pub(super) verbatim: bool,
    pub(super) room: Option<(usize, usize)>,
}

impl<'a> PromptText<'a> {
    /// The problem with `format_sentence` after it, no room checked.
    pub(super) fn formatted(format_sentence: Option<&'a str>) -> PromptText<'a> {
        PromptText {
            format_sentence,
            verbatim: false,
            room: None,
        }
    }

    /// As `cfg` renders it, no room checked.
    pub(super) fn of(cfg: &'a GenerationConfig) -> PromptText<'a> {
        PromptText {
            format_sentence: cfg.format_sentence.as_deref(),
            verbatim: cfg.verbatim,
            room: None,
        }
    }
}

/// A prompt without room for the new tokens in the model's context: its position among the
/// requests, its length, the new tokens asked for and the context length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    pub at: usize,
    pub len: usize,
    pub new: usize,
    pub context: usize,
}

impl NoRoom {
    /// The prompt at `at` of `len` tokens, when `new` more do not fit in `context`.
    pub(super) fn of(at: usize, len: usize, new: usize, context: Option<usize>) -> Option<NoRoom> {
        let context = context.filter(|&c| len + new > c)?;
        Some(NoRoom {
            at,
            len,
            new,
            context,
        })
    }
}

impl std::fmt::Display for NoRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens and {} new ones exceed the model's context length of {}",
            self.len, self.new, self.context
        )?;
        match self.context.checked_sub(self.len) {
            Some(room) if room > 0 => write!(f, " (room for {room} new tokens)"),
            _ => write!(f, " (the prompt alone fills it)"),
        }
    }
}

impl From<NoRoom> for EngineError {
    fn from(r: NoRoom) -> EngineError {
        EngineError::Config(format!(
            "prompt {}: {r} (fewer or smaller images, or fewer new tokens)",
            r.at
        ))
    }
}

/// Each request's prompt ids (image placeholders expanded) and image grids. The prompts need
/// only each image's patch grid; the pixels are prepared next to the vision calls. A prompt
/// without room for the new tokens ([`PromptText::room`]) is an error naming its position
/// (`at[i]` for `requests[i]`).
pub(super) fn tokenize(
    builder: &PromptBuilder,
    pre: &PreprocessorConfig,
    merge: u32,
    requests: &[&Request],
    at: &[usize],
    text: PromptText<'_>,
) -> Result<(Vec<Vec<u32>>, Vec<ImageGrids>), EngineError> {
    let (mut grids, mut prompts) = (Vec::new(), Vec::new());
    for (&r, &at) in requests.iter().zip(at) {
        let sizes: Vec<(u32, u32)> = r.images.iter().map(|i| i.dimensions()).collect();
        let (ids, g) = prompt_ids(builder, pre, merge, &r.problem, &sizes, text).map_err(|e| {
            EngineError::InPrompt {
                at,
                cause: Box::new(e),
            }
        })?;
        if let Some((context, new)) = text.room {
            if let Some(r) = NoRoom::of(at, ids.len(), new, Some(context)) {
                return Err(r.into());
            }
        }
        prompts.push(ids);
        grids.push(g);
    }
    Ok((prompts, grids))
}

/// A problem's prompt ids (image placeholders expanded for images of `sizes`, `(w, h)` each) and
/// its images' grids.
pub(super) fn prompt_ids(
    builder: &PromptBuilder,
    pre: &PreprocessorConfig,
    merge: u32,
    problem: &str,
    sizes: &[(u32, u32)],
    text: PromptText<'_>,
) -> Result<(Vec<u32>, ImageGrids), EngineError> {
    let g = sizes
        .iter()
        .map(|&(w, h)| grid_thw(w, h, pre))
        .collect::<Result<Vec<_>, _>>()?;
    let msgs = match text.verbatim {
        true => PromptBuilder::verbatim(problem),
        false => PromptBuilder::content(problem, text.format_sentence),
    };
    let rendered = builder.render(&msgs)?;
    let counts: Vec<usize> = g.iter().map(|g| image_tokens(*g, merge)).collect();
    Ok((builder.encode(&rendered, &counts)?, g))
}

/// One request's image grids, `[t, h, w]` in patches each.
pub type ImageGrids = Vec<[u32; 3]>;
