//! What GRPO and SFT share to run data parallel ([`crate::dist`]): each rank's GPU, errors
//! agreed on by every rank, gradients summed, the replicas' identity checked, and the metrics
//! that differ per rank (times, memory) reduced as one process would report them.

use super::*;
use crate::dist::World;

/// `r` on every rank: where any rank failed, every rank returns that rank's error as
/// [`TrainError::Rank`] (the failing rank too) — so that all leave the step together instead
/// of waiting in a collective for one that has gone, and each knows the failure is shared.
pub(super) fn agree<T>(world: &World, r: Result<T, TrainError>) -> Result<T, TrainError> {
    if world.size == 1 {
        return r;
    }
    let mine: Option<String> = r.as_ref().err().map(|e| crate::error_chain(e));
    let failed = (world.gather(&mine).into_iter().enumerate())
        .find_map(|(rank, e)| e.map(|msg| TrainError::Rank { rank, msg }));
    match failed {
        Some(e) => Err(e),
        None => r,
    }
}

/// Whether every rank has `e` at this point (a world of one, or an error [`agree`] shared):
/// only then may the ranks go on to a collective such as a checkpoint.
pub(super) fn shared(world: &World, e: &TrainError) -> bool {
    world.size == 1 || matches!(e, TrainError::Rank { .. })
}

/// How a run sums its gradients over the ranks: NCCL through the GPUs, or MPI on the host.
pub(super) struct Reducer {
    #[cfg(feature = "mpi")]
    gpu: Option<crate::dist::GpuSum>,
}

impl Reducer {
    /// The reducer `how` asks for: `Auto` takes NCCL where every rank's kernels run on CUDA
    /// (its communicator on their stream), MPI otherwise. Every rank calls it at the same point.
    pub(super) fn open(
        world: &World,
        backend: &Backend,
        how: config::Allreduce,
    ) -> Result<Reducer, TrainError> {
        use config::Allreduce;
        let stream = match backend {
            Backend::Cuda(c) => Some(c.stream().clone()),
            Backend::Cpu => None,
        };
        let everywhere = world.size > 1 && !world.any(stream.is_none());
        let bad = |msg: String| {
            TrainError::Config(config::ConfigError::Value {
                key: "allreduce",
                msg,
            })
        };
        if how == Allreduce::Nccl && !everywhere {
            return Err(bad(format!(
                "\"nccl\" sums through the GPUs: every rank's kernels must run on CUDA{}",
                if cfg!(feature = "mpi") {
                    ""
                } else {
                    " (and ssrl be built with --features mpi)"
                }
            )));
        }
        if world.size == 1 || how == Allreduce::Mpi || !everywhere {
            return Ok(Reducer {
                #[cfg(feature = "mpi")]
                gpu: None,
            });
        }
        #[cfg(feature = "mpi")]
        {
            let opened = crate::dist::GpuSum::open(world, stream.expect("every rank has CUDA"));
            let opened = agree(world, opened.map_err(bad))?;
            Ok(Reducer { gpu: Some(opened) })
        }
        #[cfg(not(feature = "mpi"))]
        unreachable!("a world of several ranks needs the mpi build")
    }

    /// "nccl" or "mpi" (the metrics' and messages' name).
    pub(super) fn name(&self) -> &'static str {
        #[cfg(feature = "mpi")]
        if self.gpu.is_some() {
            return "nccl";
        }
        "mpi"
    }
}

/// Each gradient summed over the ranks, in place (one collective over all tensors). Returns
/// the seconds this rank waited for the others to arrive (the ranks' imbalance) and the
/// seconds of the sum itself.
pub(super) fn sum_grads(
    world: &World,
    reducer: &Reducer,
    grads: &mut [Vec<f32>],
) -> Result<(f64, f64), TrainError> {
    if world.size == 1 {
        return Ok((0.0, 0.0));
    }
    let t = Instant::now();
    world.barrier();
    let wait = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut flat: Vec<f32> = Vec::with_capacity(grads.iter().map(Vec::len).sum());
    grads.iter().for_each(|g| flat.extend_from_slice(g));
    #[cfg(feature = "mpi")]
    if let Some(gpu) = &reducer.gpu {
        gpu.sum_f32(&mut flat)
            .map_err(|msg| TrainError::Run { graph: "nccl", msg })?;
    } else {
        world.sum_f32(&mut flat);
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = reducer;
        world.sum_f32(&mut flat);
    }
    let mut at = 0;
    for g in grads.iter_mut() {
        let n = g.len();
        g.copy_from_slice(&flat[at..at + n]);
        at += n;
    }
    Ok((wait, t.elapsed().as_secs_f64()))
}

/// Every rank's LoRA tensors (and their optimizer moments) compared by digest after `step`:
/// ranks that apply the same summed gradients keep identical replicas; one that does not is
/// an error naming it, before it can write a diverged checkpoint.
pub(super) fn check_replicas(
    world: &World,
    params: &[Param],
    step: usize,
) -> Result<(), TrainError> {
    if world.size == 1 {
        return Ok(());
    }
    let d = crate::dist::digest(
        params
            .iter()
            .flat_map(|p| [&p.value[..], &p.m[..], &p.v[..]]),
    );
    let all = world.gather(&d);
    match all.iter().position(|x| *x != all[0]) {
        None => Ok(()),
        Some(rank) => Err(TrainError::Rank {
            rank,
            msg: format!(
                "its LoRA tensors differ from rank 0's after step {step} (digest {:016x} vs \
                 {:016x}): the replicas diverged, so the run stops before saving them",
                all[rank], all[0]
            ),
        }),
    }
}

/// The loss scale every rank continues with: the lowest (a rank whose half-precision gradients
/// overflowed backed off; the others follow, so that every rank scales alike).
pub(super) fn agree_loss_scale(world: &World, s: &mut Option<LossScale>) {
    if world.size == 1 {
        return;
    }
    if let Some(s) = s {
        let all = world.gather(&*s);
        if let Some(low) = all
            .into_iter()
            .reduce(|a, b| if b.scale < a.scale { b } else { a })
        {
            *s = low;
        }
    }
}

/// The step's metrics as one process reports them: times and peak memory are each rank's,
/// so their maximum over the ranks (the step waits for the slowest) is kept; the rest every
/// rank computed from values gathered from all, and rank 0's are kept. Adds `dist/ranks`.
pub(super) fn merge_metrics(world: &World, m: &mut Metrics) {
    if world.size == 1 {
        return;
    }
    let per_rank = |k: &str| k.starts_with("timing_s/") || k.starts_with("perf/");
    let mine: Vec<(String, f64)> = (m.iter())
        .filter(|(k, _)| per_rank(k))
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    for (k, v) in world.gather(&mine).into_iter().flatten() {
        let e = m.entry(k).or_insert(v);
        *e = e.max(v);
    }
    let root = world.broadcast(m.clone());
    *m = root;
    m.insert("dist/ranks".into(), world.size as f64);
}

/// Rank 0's `result` (which only rank 0 computed: `Some` there, `None` elsewhere) on every
/// rank; its failure is rank 0's error on the others.
pub(super) fn from_root<T: serde::Serialize + serde::de::DeserializeOwned>(
    world: &World,
    result: Option<Result<T, TrainError>>,
) -> Result<T, TrainError> {
    if world.size == 1 {
        return result.expect("rank 0 computes it");
    }
    match result {
        Some(r) => {
            let sent: Result<&T, String> = r.as_ref().map_err(|e| crate::error_chain(e));
            world.send_from_root(&sent);
            r
        }
        None => world
            .recv_from_root::<Result<T, String>>()
            .map_err(|msg| TrainError::Rank { rank: 0, msg }),
    }
}

/// A run's metrics.jsonl: written by rank 0 alone.
pub(super) struct RunLog(Option<PathBuf>);

impl RunLog {
    pub(super) fn append(&self, m: &Metrics) -> Result<(), TrainError> {
        match &self.0 {
            Some(p) => append_metrics(p, m),
            None => Ok(()),
        }
    }
}

/// The run folder's settings file and metrics.jsonl readied by rank 0 ([`open_run`]).
pub(super) fn open_log(
    world: &World,
    out: &Path,
    name: &str,
    toml: &str,
    step: usize,
) -> Result<RunLog, TrainError> {
    let opened = world.is_root().then(|| open_run(out, name, toml, step));
    let path = from_root(world, opened)?;
    Ok(RunLog(world.is_root().then_some(path)))
}

/// A run's loss and graph statistics summed over the ranks (each rank's loss is its tokens'
/// share of the global token mean, so the shares add up).
pub(super) fn sum_loss(world: &World, loss: f64, stats: Stats) -> (f64, Stats) {
    if world.size == 1 {
        return (loss, stats);
    }
    let all = world.gather(&(loss, stats));
    let loss = all.iter().map(|a| a.0).sum();
    let stats = all.into_iter().fold(Stats::default(), |mut acc, a| {
        acc.add(&a.1);
        acc
    });
    (loss, stats)
}

/// A checkpoint of `params` after `step` (a PEFT adapter and the optimizer's moments). Every
/// rank calls it at the same point: the replicas are checked identical, rank 0 writes, and
/// every rank gets its folder (or its error).
#[allow(clippy::too_many_arguments)]
pub(super) fn save(
    world: &World,
    params: &[Param],
    step: usize,
    resume_key: String,
    loss_scale: Option<LossScale>,
    out: &Path,
    model: &Path,
    lora: &crate::model::package::LoraSpec,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    check_replicas(world, params, step)?;
    let written = world.is_root().then(|| {
        let state = Param::state(params, step, resume_key, loss_scale);
        write_checkpoint(out, model, lora, &state, keep)
    });
    from_root(world, written)
}
