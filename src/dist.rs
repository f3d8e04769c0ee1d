//! Data parallel over processes: the launcher's ranks (`mpirun`, `srun`, MPICH's `mpiexec`),
//! MPI for the rendezvous and the collectives, and how a step's work is dealt over the ranks.
//!
//! One process without a launcher is a world of one ([`World::solo`]): every collective is then
//! the identity, so the trainers run the same code either way. Under a launcher, the build with
//! the `mpi` feature joins the launcher's MPI world ([`init`]); the default build refuses with
//! how to build it. The trainers call the collectives from one thread, in the same order on
//! every rank.

use serde::{de::DeserializeOwned, Serialize};
use std::sync::OnceLock;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "launched by {launcher} as {size} ranks, but this ssrl was built without MPI: build it \
         with `cargo build --release --features mpi` (needs an MPI library's headers and \
         libclang: `apt-get install libopenmpi-dev openmpi-bin libclang-dev`)"
    )]
    NoMpi { launcher: String, size: usize },
    #[error("launched by {launcher} as {expected} ranks, but MPI sees {got}: {hint}")]
    Mismatch {
        launcher: String,
        expected: usize,
        got: usize,
        hint: &'static str,
    },
    #[error("{launcher}: {var} = {value:?} is not a number")]
    BadVar {
        launcher: String,
        var: &'static str,
        value: String,
    },
    #[error("MPI could not be initialised (it was initialised before)")]
    Init,
}

/// What the launcher said about this process: its rank, the world's size and the rank on
/// this node (`LOCAL_RANK`: which GPU of the node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub launcher: String,
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
}

/// The launch described by `var` (the process environment, or a test's), `None` without a
/// launcher. Open MPI's `mpirun`, MPICH / Intel MPI's `mpiexec` (PMI), SLURM's `srun` and
/// torchrun-style `RANK` / `WORLD_SIZE` / `LOCAL_RANK` are recognised, in that order.
pub fn launch_from(var: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>, DistError> {
    const LAUNCHERS: [(&str, [&str; 3]); 4] = [
        (
            "mpirun (Open MPI)",
            [
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
            ],
        ),
        ("mpiexec (PMI)", ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"]),
        (
            "srun (SLURM)",
            ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
        ),
        ("torchrun-style RANK", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
    ];
    for (launcher, [rank, size, local]) in LAUNCHERS {
        let (Some(r), Some(s)) = (var(rank), var(size)) else {
            continue;
        };
        let num = |name: &'static str, v: String| {
            v.trim().parse::<usize>().map_err(|_| DistError::BadVar {
                launcher: launcher.to_string(),
                var: name,
                value: v,
            })
        };
        let rank_n = num(rank, r)?;
        let size_n = num(size, s)?;
        let local_n = match var(local) {
            Some(v) => num(local, v)?,
            None => rank_n,
        };
        return Ok(Some(Launch {
            launcher: launcher.to_string(),
            rank: rank_n,
            size: size_n.max(1),
            local_rank: local_n,
        }));
    }
    Ok(None)
}

/// This process's world: its rank among `size`, and the collectives over them.
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank on this node (the GPU a CUDA run takes).
    pub local_rank: usize,
    /// What launched the ranks ("" for one process without a launcher).
    pub launcher: String,
    #[cfg(feature = "mpi")]
    mpi: Option<mpi_world::MpiWorld>,
}

static WORLD: OnceLock<World> = OnceLock::new();
static SOLO: World = World::solo();

/// Joins the launcher's world (MPI under `mpirun` / `srun`), once per process; without a
/// launcher, or with one rank, a world of one. Later calls return the same world.
pub fn init() -> Result<&'static World, DistError> {
    if let Some(w) = WORLD.get() {
        return Ok(w);
    }
    let launch = launch_from(|k| std::env::var(k).ok())?;
    let world = match launch {
        Some(l) if l.size > 1 => World::join(l)?,
        Some(l) => World {
            local_rank: l.local_rank,
            ..World::solo()
        },
        None => World::solo(),
    };
    Ok(WORLD.get_or_init(|| world))
}

/// The world [`init`] joined; a world of one where it was not called (the library's callers,
/// the tests).
pub fn world() -> &'static World {
    WORLD.get().unwrap_or(&SOLO)
}

/// Ends MPI cleanly (`MPI_Finalize`) after every rank's last collective; nothing for a world
/// of one.
pub fn finish() {
    #[cfg(feature = "mpi")]
    if let Some(w) = WORLD.get() {
        if let Some(m) = &w.mpi {
            m.finish();
        }
    }
}

impl World {
    pub const fn solo() -> World {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            launcher: String::new(),
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    #[cfg(not(feature = "mpi"))]
    fn join(l: Launch) -> Result<World, DistError> {
        Err(DistError::NoMpi {
            launcher: l.launcher,
            size: l.size,
        })
    }

    #[cfg(feature = "mpi")]
    fn join(l: Launch) -> Result<World, DistError> {
        let m = mpi_world::MpiWorld::init()?;
        let (rank, size) = m.rank_size();
        if size != l.size {
            return Err(DistError::Mismatch {
                launcher: l.launcher,
                expected: l.size,
                got: size,
                hint: "launch with the mpirun / mpiexec of the MPI library ssrl was built \
                       against, or with srun --mpi=pmix (torchrun's rendezvous is not MPI's)",
            });
        }
        Ok(World {
            rank,
            size,
            local_rank: l.local_rank,
            launcher: l.launcher,
            mpi: Some(m),
        })
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// This rank's positions among `n` items dealt round robin: `rank`, `rank + size`, … —
    /// every rank gets ⌊n / size⌋ or one more, and any run of `size` consecutive items is
    /// spread over all ranks.
    pub fn share(&self, n: usize) -> Vec<usize> {
        (self.rank..n).step_by(self.size).collect()
    }

    /// Each value summed over the ranks, in place (every rank gets the sums).
    pub fn sum_f32(&self, v: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.all_reduce(v, mpi_world::Op::Sum);
        }
        let _ = v;
    }

    /// Each value summed over the ranks, in place.
    pub fn sum_f64(&self, v: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.all_reduce(v, mpi_world::Op::Sum);
        }
        let _ = v;
    }

    /// Each value's maximum over the ranks, in place.
    pub fn max_f64(&self, v: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.all_reduce(v, mpi_world::Op::Max);
        }
        let _ = v;
    }

    /// The sum of `n` over the ranks.
    pub fn sum_usize(&self, n: usize) -> usize {
        let mut v = [n as f64];
        self.sum_f64(&mut v);
        v[0] as usize
    }

    /// Every rank's `value`, in rank order, on every rank (sent as JSON).
    pub fn gather<T: Serialize + DeserializeOwned>(&self, value: &T) -> Vec<T> {
        let bytes = serde_json::to_vec(value).expect("a value of plain data serialises");
        self.gather_bytes(bytes)
            .iter()
            .map(|b| serde_json::from_slice(b).expect("a rank sent what it serialised"))
            .collect()
    }

    fn gather_bytes(&self, bytes: Vec<u8>) -> Vec<Vec<u8>> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            return m.all_gather_bytes(&bytes);
        }
        vec![bytes]
    }

    /// Rank 0's `value`, on every rank.
    pub fn broadcast<T: Serialize + DeserializeOwned>(&self, value: T) -> T {
        if self.size == 1 {
            return value;
        }
        let mut all = self.gather(&value);
        all.swap_remove(0)
    }

    /// Sends rank 0's `value` to every rank (rank 0's half of a broadcast; the others call
    /// [`World::recv_from_root`] at the same point).
    pub fn send_from_root<S: Serialize + ?Sized>(&self, value: &S) {
        let bytes = serde_json::to_vec(value).expect("a value of plain data serialises");
        self.gather_bytes(bytes);
    }

    /// What rank 0 sent with [`World::send_from_root`].
    pub fn recv_from_root<R: DeserializeOwned>(&self) -> R {
        let all = self.gather_bytes(Vec::new());
        serde_json::from_slice(&all[0]).expect("rank 0 sent what it serialised")
    }

    /// Whether `flag` holds on any rank (every rank gets the same answer).
    pub fn any(&self, flag: bool) -> bool {
        let mut v = [f64::from(u8::from(flag))];
        self.max_f64(&mut v);
        v[0] > 0.0
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.barrier();
        }
    }

    /// Ends every rank of the run at once (`MPI_Abort`), after this rank said why; a world of
    /// one just exits.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            m.abort(code);
        }
        std::process::exit(code)
    }

    /// Says on rank 0 how the work is shared, under a launcher (nothing for a world of one).
    pub fn announce(&self, what: &str) {
        if self.size > 1 && self.is_root() {
            eprintln!(
                "data parallel: {} ranks launched by {}; {what}",
                self.size, self.launcher
            );
        }
    }

    /// "rank R of N" for messages, empty for a world of one.
    pub fn who(&self) -> String {
        match self.size {
            1 => String::new(),
            n => format!("rank {} of {n}", self.rank),
        }
    }
}

/// The GPU of this process: `device_id` plus the launcher's local rank under a launcher (one
/// process per GPU of a node), `device_id` itself for a world of one.
pub fn device_of(device_id: i32) -> i32 {
    let w = world();
    if w.size > 1 {
        device_id + w.local_rank as i32
    } else {
        device_id
    }
}

/// A digest of `values`' bits (FNV-1a over the f32 words): what ranks compare to prove their
/// replicas are identical.
pub fn digest<'a>(values: impl IntoIterator<Item = &'a [f32]>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in values {
        for x in v {
            h ^= u64::from(x.to_bits());
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= v.len() as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use super::DistError;
    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::traits::*;
    use std::sync::Mutex;

    pub(super) enum Op {
        Sum,
        Max,
    }

    /// MPI's world communicator and the universe that finalises MPI when dropped. Collectives
    /// are called from the thread that initialised MPI only (`MPI_THREAD_FUNNELED`); the
    /// `Sync` below is for the process-wide handle, not for concurrent use.
    pub(super) struct MpiWorld {
        universe: Mutex<Option<mpi::environment::Universe>>,
        comm: mpi::topology::SimpleCommunicator,
    }

    // SAFETY: see the type's comment — one thread makes every MPI call.
    unsafe impl Sync for MpiWorld {}
    unsafe impl Send for MpiWorld {}

    /// Elements per MPI call: counts are C ints, and a bounded scratch buffer.
    const CHUNK: usize = 1 << 24;

    impl MpiWorld {
        pub(super) fn init() -> Result<MpiWorld, DistError> {
            let (universe, _) =
                mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or(DistError::Init)?;
            let comm = universe.world();
            Ok(MpiWorld {
                universe: Mutex::new(Some(universe)),
                comm,
            })
        }

        pub(super) fn rank_size(&self) -> (usize, usize) {
            (self.comm.rank() as usize, self.comm.size() as usize)
        }

        pub(super) fn all_reduce<T: Equivalence + Copy + Default>(&self, v: &mut [T], op: Op) {
            let op = match op {
                Op::Sum => SystemOperation::sum(),
                Op::Max => SystemOperation::max(),
            };
            let mut out = vec![T::default(); v.len().min(CHUNK)];
            for part in v.chunks_mut(CHUNK) {
                let out = &mut out[..part.len()];
                self.comm.all_reduce_into(&*part, out, op);
                part.copy_from_slice(out);
            }
        }

        pub(super) fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
            let n = self.comm.size() as usize;
            let mut counts = vec![0i32; n];
            self.comm
                .all_gather_into(&(bytes.len() as i32), &mut counts[..]);
            let displs: Vec<i32> = counts
                .iter()
                .scan(0i32, |at, c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let total: usize = counts.iter().map(|c| *c as usize).sum();
            let mut buf = vec![0u8; total];
            {
                let mut part = PartitionMut::new(&mut buf[..], &counts[..], &displs[..]);
                self.comm.all_gather_varcount_into(bytes, &mut part);
            }
            counts
                .iter()
                .zip(&displs)
                .map(|(c, d)| buf[*d as usize..(*d + *c) as usize].to_vec())
                .collect()
        }

        pub(super) fn barrier(&self) {
            self.comm.barrier();
        }

        pub(super) fn abort(&self, code: i32) -> ! {
            self.comm.abort(code)
        }

        pub(super) fn finish(&self) {
            let mut u = self.universe.lock().unwrap_or_else(|e| e.into_inner());
            u.take();
        }
    }
}

/// Sums over the ranks' GPUs with NCCL (cudarc's bindings, `libnccl.so` loaded at run time):
/// the communicator's unique id made on rank 0 and sent to the others over MPI, as NCCL's
/// documentation does it. A host buffer goes to the device, is summed in place there and comes
/// back; between GPUs of a node NCCL takes NVLink, between nodes the network it finds.
#[cfg(feature = "mpi")]
pub struct GpuSum {
    comm: cudarc::nccl::safe::Comm,
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

#[cfg(feature = "mpi")]
impl GpuSum {
    /// The communicator of `world`'s ranks, each on the GPU of `stream` (a world of one makes
    /// a communicator of one). Every rank calls it at the same point.
    pub fn open(
        world: &World,
        stream: std::sync::Arc<cudarc::driver::CudaStream>,
    ) -> Result<GpuSum, String> {
        use cudarc::nccl::safe::{Comm, Id};
        use std::ffi::c_char;
        let nccl = |e: cudarc::nccl::result::NcclError| format!("NCCL: {e:?}");
        let id = match world.is_root() {
            true => {
                let id = Id::new().map_err(|e| format!("{} (is libnccl.so installed?)", nccl(e)));
                if world.size > 1 {
                    let sent: Result<Vec<c_char>, String> = id
                        .as_ref()
                        .map(|i| i.internal().to_vec())
                        .map_err(Clone::clone);
                    world.send_from_root(&sent);
                }
                id?
            }
            false => {
                let got: Result<Vec<c_char>, String> = world.recv_from_root();
                let bytes: [c_char; 128] = got
                    .map_err(|e| format!("rank 0: {e}"))?
                    .try_into()
                    .map_err(|_| "rank 0 sent an NCCL id of another size".to_string())?;
                Id::uninit(bytes)
            }
        };
        let comm = Comm::from_rank(stream.clone(), world.rank, world.size, id).map_err(nccl)?;
        Ok(GpuSum { comm, stream })
    }

    /// `v` summed over the ranks, in place, through the GPUs.
    pub fn sum_f32(&self, v: &mut [f32]) -> Result<(), String> {
        use cudarc::nccl::safe::ReduceOp;
        let cuda = |e: cudarc::driver::DriverError| format!("CUDA: {e}");
        let mut d = self.stream.clone_htod(v).map_err(cuda)?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|e| format!("NCCL all-reduce: {e:?}"))?;
        self.stream.memcpy_dtoh(&d, v).map_err(cuda)?;
        self.stream.synchronize().map_err(cuda)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
    }

    #[test]
    fn launchers_are_read_from_their_variables() {
        assert_eq!(launch_from(env(&[])).unwrap(), None);
        let ompi = launch_from(env(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "8"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("RANK", "5"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((ompi.rank, ompi.size, ompi.local_rank), (3, 8, 1));
        assert!(ompi.launcher.contains("Open MPI"));
        let slurm = launch_from(env(&[("SLURM_PROCID", "2"), ("SLURM_NTASKS", "4")]))
            .unwrap()
            .unwrap();
        assert_eq!((slurm.rank, slurm.size, slurm.local_rank), (2, 4, 2));
        let bad = launch_from(env(&[("PMI_RANK", "x"), ("PMI_SIZE", "2")])).unwrap_err();
        assert!(bad.to_string().contains("PMI_RANK"), "{bad}");
    }

    #[test]
    fn shares_cover_every_item_once() {
        for size in 1..5 {
            for n in 0..11 {
                let mut seen = vec![0; n];
                for rank in 0..size {
                    let w = World {
                        rank,
                        size,
                        ..World::solo()
                    };
                    let s = w.share(n);
                    assert!(s.len() == n / size || s.len() == n / size + 1);
                    s.iter().for_each(|&i| seen[i] += 1);
                }
                assert!(seen.iter().all(|&c| c == 1), "{size} ranks, {n} items");
            }
        }
    }

    #[test]
    fn a_world_of_one_keeps_its_values() {
        let w = World::solo();
        let mut v = [1.5f32, -2.0];
        w.sum_f32(&mut v);
        assert_eq!(v, [1.5, -2.0]);
        assert_eq!(w.gather(&vec![1u32, 2]), vec![vec![1u32, 2]]);
        assert!(w.any(true) && !w.any(false));
        assert_ne!(digest([&[1.0f32][..]]), digest([&[1.0f32, 0.0][..]]));
    }
}
