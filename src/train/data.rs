//! The prompts a run trains on: data files read, screened for what a step could not use, and
//! loaded (images decoded) for a step, in the background.

use super::*;

/// A prompt set: samples and the folder their image paths resolve against.
pub(super) struct Dataset {
    pub(super) samples: Vec<SampleRecord>,
    pub(super) roots: Vec<PathBuf>,
}

/// The samples of `files`, each a data file or a folder of them (an `ssrl tasks` output folder or
/// its `data/`: every shard, in name order).
pub(super) fn load_dataset(
    files: &[PathBuf],
    image_dir: Option<&Path>,
) -> Result<Dataset, TrainError> {
    let mut d = Dataset {
        samples: vec![],
        roots: vec![],
    };
    for given in files {
        for (s, root) in read_dataset(given, image_dir, usize::MAX)? {
            d.samples.push(s);
            d.roots.push(root);
        }
    }
    Ok(d)
}

/// A sample and the folder its images resolve against, before the images are decoded.
pub(super) type PendingRequest = (SampleRecord, PathBuf);

impl Dataset {
    pub(super) fn pending(&self, idx: &[usize]) -> Vec<PendingRequest> {
        idx.iter()
            .map(|&i| (self.samples[i].clone(), self.roots[i].clone()))
            .collect()
    }
}

/// Decodes the images of a batch on the rayon pool; each request's id (which keys its random
/// streams) is keyed by `salt` and its key in `keys` (its position in the step's whole batch,
/// whichever rank loads it). A sample whose images cannot be decoded gives `file: cause`.
pub(super) fn load_requests(
    items: &[PendingRequest],
    keys: &[usize],
    salt: u64,
) -> Vec<Result<Request, String>> {
    items
        .par_iter()
        .zip(keys)
        .map(|((sample, root), &k)| {
            Ok(Request {
                id: mix64(salt ^ mix64(k as u64 + 1)),
                problem: sample.problem.clone(),
                images: sample
                    .load_images(root)
                    .map_err(|e| crate::error_chain(&e))?,
            })
        })
        .collect()
}

/// The keys of `keys` whose requests loaded (`loaded`, in the same order) and those requests;
/// the others, each with its cause, in `left_out`.
pub(super) fn usable(
    keys: &[usize],
    loaded: Vec<Result<Request, String>>,
) -> (Vec<usize>, Vec<Request>, Vec<(usize, String)>) {
    let (mut kept, mut reqs) = (
        Vec::with_capacity(keys.len()),
        Vec::with_capacity(keys.len()),
    );
    let mut left_out = Vec::new();
    for (&k, r) in keys.iter().zip(loaded) {
        match r {
            Ok(r) => {
                kept.push(k);
                reqs.push(r);
            }
            Err(e) => left_out.push((k, e)),
        }
    }
    (kept, reqs, left_out)
}

pub(super) type Prefetch = (usize, std::thread::JoinHandle<Vec<Result<Request, String>>>);

/// The sentence appended to each problem (`data.format_prompt`; none when empty).
pub(super) fn format_sentence(cfg: &TrainConfig) -> Option<String> {
    let f = &cfg.data.format_prompt;
    (!f.is_empty()).then(|| f.clone())
}

/// `d` without the prompts a step could not use: those with an image whose header cannot be
/// read (missing, or not an image) or whose prompt cannot be built from its images
/// (placeholders that do not match them), either of which would stop the run at its step, and
/// those without an answer for the reward. With `data.filter_overlong_prompts` (EasyR1's),
/// also those over `data.max_prompt_length` tokens or without room for
/// `data.max_response_length` in the model's context (the image tokens counted from each
/// image's size, read from its header). Returns the dataset kept, how many were too long, and
/// why each unusable one was left out (`file: cause`, or `sample ID: cause`).
pub(super) fn screened(
    engine: &Engine,
    cfg: &TrainConfig,
    d: Dataset,
) -> Result<(Dataset, usize, Vec<String>), TrainError> {
    // The prompts as rollouts render them.
    let gen = GenerationConfig {
        group: 1,
        max_new_tokens: cfg.data.max_response_length,
        sampling: SamplingParams::default(),
        verbatim: false,
        format_sentence: format_sentence(cfg),
    };
    let room = engine.context_length().map_or(usize::MAX, |c| {
        c.saturating_sub(cfg.data.max_response_length)
    });
    let limit = cfg.data.max_prompt_length.min(room);
    let n = d.samples.len();
    let mut kept = Dataset {
        samples: Vec::with_capacity(n),
        roots: Vec::with_capacity(n),
    };
    // Headers on all cores, the tokenizer on this thread.
    let sizes: Vec<Result<Vec<(u32, u32)>, String>> = (d.samples.par_iter().zip(&d.roots))
        .map(|(s, root)| {
            (s.images.iter())
                .map(|i| i.size(root).map_err(|e| crate::error_chain(&e)))
                .collect()
        })
        .collect();
    let (mut overlong, mut unusable) = (0, Vec::new());
    for ((s, root), sizes) in d.samples.into_iter().zip(d.roots).zip(sizes) {
        if s.answer.is_empty() {
            unusable.push(format!("sample {}: no answer to score against", s.id));
            continue;
        }
        let sizes = match sizes {
            Ok(sizes) => sizes,
            Err(e) => {
                unusable.push(e);
                continue;
            }
        };
        let len = match engine.prompt_length(&s.problem, &sizes, &gen) {
            Ok(len) => len,
            Err(e) => {
                unusable.push(format!("sample {}: {}", s.id, crate::error_chain(&e)));
                continue;
            }
        };
        if cfg.data.filter_overlong_prompts && len > limit {
            overlong += 1;
            continue;
        }
        kept.samples.push(s);
        kept.roots.push(root);
    }
    Ok((kept, overlong, unusable))
}
