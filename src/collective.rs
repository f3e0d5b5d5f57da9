//! Data-parallel training over [burn-collective] (feature `collective`): one process per rank,
//! on one machine or several, each with its own [`OffloadPolicy`](crate::OffloadPolicy).
//!
//! What each rank does:
//! 1. [`CollectiveRank::register`] with a [`CollectiveSetup`]: its rank, the number of ranks,
//!    the orchestrator's address and the address and port the other ranks reach it on. It
//!    returns when every rank has registered.
//! 2. [`CollectiveRank::broadcast_module`]: every rank's model gets the root rank's parameter
//!    values. A parameter that this rank keeps in host memory stays there, in its model's
//!    [`OffloadContext`].
//! 3. Each step, after the backward pass: [`CollectiveRank::all_reduce_grads`] replaces the
//!    gradients of the model's parameters by their mean over the ranks, before the optimizer
//!    step (wrap the optimizer in [`OffloadOptimizer`](crate::OffloadOptimizer) as for a
//!    single process).
//! 4. [`CollectiveRank::finish`].
//!
//! One process (any, or a process of its own) runs the [`Orchestrator`], burn-collective's
//! global orchestrator, a WebSocket server that ranks meet at.
//!
//! **Every call is bounded in time.** burn-collective's calls block until every rank has made
//! the same call, and it does not notice a peer that died in between (its orchestrator keeps
//! no liveness; a lost connection panics its server task, or leaves it waiting). Each call here
//! runs on a helper thread and is given up after [`CollectiveSetup::timeout`]: a dead peer, a
//! peer that never calls, or an unreachable orchestrator ends in
//! [`OffloadError::CollectiveTimeout`] or [`OffloadError::Collective`] on every rank that is
//! still alive. Before exchanging data, the ranks exchange what they are about to exchange
//! (which operation, how many values, the parameter shapes): if they disagree, every rank ends
//! with [`OffloadError::CollectiveMismatch`], which says what each rank sent.
//! After an error, burn-collective's state in this process is unusable (a call may still be
//! pending in it): every later call returns the first error; end the process.
//!
//! Broadcasts and gradient all-reduces go as one vector in module order (not by parameter id,
//! which differs between ranks), cut in chunks of [`CollectiveSetup::chunk_bytes`]: the device
//! holds about one chunk beyond what it keeps, and a step makes one exchange per chunk whatever
//! the number of parameters.
//!
//! What comes from burn-collective 0.21:
//! - its multi-node all-reduce never returned a second time in a process (its barrier cleared
//!   a copy of its state): burn-offload builds against a patched copy, `vendor/burn-collective`;
//! - one registration per process (its local server is process-wide, per backend type, and
//!   is not reset by `finish`), and one device per process here;
//! - its global `broadcast` is not implemented (it panics): [`CollectiveRank::broadcast_module`]
//!   is a sum all-reduce in which the other ranks send negative zeros (`x + -0.0` is `x` bit
//!   for bit);
//! - its servers listen on every interface (`0.0.0.0`), the orchestrator on its port and each
//!   rank on its data port;
//! - the orchestrator handles SIGINT and SIGTERM for the whole process once started (they stop
//!   it instead of the process): run it in a process of its own where that matters.
//!
//! [burn-collective]: burn_collective

use std::fmt::Write as _;
use std::net::{TcpListener, TcpStream};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Shape, Tensor, TensorPrimitive};
use burn_backend::{DType, TensorMetadata};
use burn_collective::{CollectiveConfig, CollectiveError, PeerId, ReduceOperation};

use crate::backend::OffloadBackend;
use crate::context::{OffloadContext, querying_placement};
use crate::device::OffloadDevice;
use crate::error::OffloadError;
use crate::inner::OffloadTarget;

/// burn-collective 0.21.0 as published never returns from its second multi-node all-reduce in
/// a process; burn-offload builds against a patched copy (`vendor/burn-collective`, applied by
/// `[patch.crates-io]`). If this fails to compile, add that patch to your workspace's
/// `Cargo.toml` (see `vendor/burn-collective/BURN_OFFLOAD_PATCH.md` and the README).
const _: u32 = burn_collective::BURN_OFFLOAD_SYNC_PATCH;

/// How one process joins a data-parallel run: its rank, the number of ranks, where the
/// orchestrator listens, where the other ranks reach this one, and how long a collective call
/// may take.
#[derive(Debug, Clone, PartialEq)]
pub struct CollectiveSetup {
    rank: u32,
    world_size: u32,
    orchestrator: String,
    node_host: String,
    data_port: u16,
    timeout: Duration,
    chunk_bytes: usize,
}

impl CollectiveSetup {
    /// The default of [`timeout`](Self::timeout): 60 s.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    /// The default of [`chunk_bytes`](Self::chunk_bytes): 64 MiB.
    pub const DEFAULT_CHUNK_BYTES: usize = 64 << 20;

    /// Rank `rank` of `world_size` processes. `orchestrator` is `host:port` of the
    /// [`Orchestrator`] (`127.0.0.1:3000`; a `ws://` prefix is accepted); this rank serves its
    /// tensors on `data_port` (on every interface) and the others reach it at
    /// `node_host:data_port` (`127.0.0.1` when every rank runs on this machine, else this
    /// machine's address on the network they share).
    pub fn new(
        rank: u32,
        world_size: u32,
        orchestrator: impl Into<String>,
        node_host: impl Into<String>,
        data_port: u16,
    ) -> Self {
        Self {
            rank,
            world_size,
            orchestrator: orchestrator.into(),
            node_host: node_host.into(),
            data_port,
            timeout: Self::DEFAULT_TIMEOUT,
            chunk_bytes: Self::DEFAULT_CHUNK_BYTES,
        }
    }

    /// The most bytes (as f32) one exchange sends: a broadcast or gradient all-reduce is cut
    /// into chunks of this size, so that a model larger than device memory is broadcast
    /// through the device a chunk at a time. Smaller chunks mean more exchanges (each a few
    /// round trips between the ranks).
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes;
        self
    }

    /// How long each collective call (registration, broadcast, all-reduce, finish) may take
    /// before it fails with [`OffloadError::CollectiveTimeout`]. Give it room for the slowest
    /// rank's step: a rank waits in the call for the others to get there.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// This process's rank (burn-collective's [`PeerId`]).
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The number of ranks (processes).
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// The orchestrator's WebSocket address (`ws://host:port`).
    pub fn orchestrator_address(&self) -> String {
        ws_address(&self.orchestrator)
    }

    /// This rank's WebSocket address, as the other ranks reach it (`ws://node_host:data_port`).
    pub fn node_address(&self) -> String {
        ws_address(&format!("{}:{}", self.node_host, self.data_port))
    }

    /// The configured call timeout.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    /// The burn-collective configuration this setup registers with: one device on this node,
    /// `world_size` nodes, a ring all-reduce between them.
    pub fn collective_config(&self) -> Result<CollectiveConfig, OffloadError> {
        self.check()?;
        let parse = |address: String| {
            address
                .parse::<burn_communication::Address>()
                .map_err(|reason| OffloadError::CollectiveSetup {
                    reason: format!("address {address:?}: {reason}"),
                })
        };
        Ok(CollectiveConfig::default()
            .with_num_devices(1)
            .with_num_nodes(self.world_size)
            .with_global_address(parse(self.orchestrator_address())?)
            .with_node_address(parse(self.node_address())?)
            .with_data_service_port(self.data_port))
    }

    fn check(&self) -> Result<(), OffloadError> {
        let fail = |reason: String| Err(OffloadError::CollectiveSetup { reason });
        if self.world_size == 0 {
            return fail("a world size of 0: give the number of ranks (processes), >= 1".into());
        }
        if self.rank >= self.world_size {
            return fail(format!(
                "rank {} of a world of {}: ranks are 0..{}",
                self.rank, self.world_size, self.world_size
            ));
        }
        if self.data_port == 0 {
            return fail(
                "data port 0: give each rank a port the other ranks can reach it on".into(),
            );
        }
        if self.chunk_bytes < 4 {
            return fail(format!(
                "a chunk of {} bytes holds no f32 value: give at least 4 (default {})",
                self.chunk_bytes,
                Self::DEFAULT_CHUNK_BYTES
            ));
        }
        if self.timeout.is_zero() {
            return fail("a timeout of 0: give each collective call time to complete".into());
        }
        let orchestrator = self.orchestrator.strip_prefix("ws://");
        let valid = orchestrator
            .unwrap_or(&self.orchestrator)
            .rsplit_once(':')
            .is_some_and(|(host, port)| {
                !host.is_empty() && !host.contains('/') && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        if !valid {
            return fail(format!(
                "orchestrator address {:?}: give host:port (`127.0.0.1:3000`)",
                self.orchestrator
            ));
        }
        let host = &self.node_host;
        if host.is_empty() || host.contains('/') || (host.contains(':') && !host.starts_with('[')) {
            return fail(format!(
                "node host {:?}: give the host name or IP address the other ranks reach this \
                 one at (`127.0.0.1` on one machine)",
                self.node_host
            ));
        }
        Ok(())
    }
}

/// `ws://` + `address`, unless it has the prefix already (burn-communication refuses an
/// address without it).
fn ws_address(address: &str) -> String {
    if address.starts_with("ws://") {
        address.to_string()
    } else {
        format!("ws://{address}")
    }
}

/// burn-collective's global orchestrator, run on a background thread of this process: the
/// WebSocket server (on every interface, at `port`) that the ranks register with. Dropping it
/// stops it.
///
/// Starting it makes this process handle SIGINT and SIGTERM (burn-collective's shutdown
/// signal): they stop the orchestrator, not the process. Run it in a process of its own
/// ([`wait`](Self::wait)) if the process must still end on them.
#[derive(Debug)]
pub struct Orchestrator {
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Orchestrator {
    /// Starts the orchestrator on `port` and returns once it accepts connections (at most
    /// `timeout`).
    pub fn start(port: u16, timeout: Duration) -> Result<Self, OffloadError> {
        let fail = |reason: String| OffloadError::Collective {
            op: "orchestrator start".into(),
            rank: None,
            reason,
        };
        if port == 0 {
            return Err(OffloadError::CollectiveSetup {
                reason: "orchestrator port 0: give the port the ranks will connect to".into(),
            });
        }
        // burn-collective logs a failed bind and returns: check the port first.
        TcpListener::bind(("0.0.0.0", port)).map_err(|e| {
            fail(format!(
                "port {port} cannot be listened on ({e}): choose a free port, or stop what \
                 listens there (an orchestrator of an earlier run?)"
            ))
        })?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| fail(format!("cannot start a tokio runtime: {e}")))?;
        let thread = std::thread::Builder::new()
            .name("burn-offload-orchestrator".into())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::select! {
                        _ = burn_collective::start_global_orchestrator(port) => {}
                        _ = stopped => {}
                    }
                });
                // Dropping the runtime ends the server's tasks and closes its port.
            })
            .map_err(|e| fail(format!("cannot start its thread: {e}")))?;
        let orchestrator = Self {
            port,
            stop: Some(stop),
            thread: Some(thread),
        };
        let deadline = Instant::now() + timeout;
        loop {
            if orchestrator
                .thread
                .as_ref()
                .is_some_and(|t| t.is_finished())
            {
                return Err(fail(format!(
                    "it stopped right away (port {port} taken in the meantime? see its log)"
                )));
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(orchestrator);
            }
            if Instant::now() >= deadline {
                return Err(fail(format!(
                    "it did not accept connections on port {port} within {:.1} s",
                    timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Blocks until the orchestrator ends (on SIGINT or SIGTERM): for a process that only runs
    /// the orchestrator.
    pub fn wait(mut self) {
        // Held (not sent, not dropped: either would stop it) until the orchestrator ends.
        let _stop = self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Set by the first registration in this process (burn-collective's local server is
/// process-wide and is not reset by `finish`).
static REGISTERED: AtomicBool = AtomicBool::new(false);

/// Which collective operation a rank is in: the first value of the header the ranks compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Broadcast = 1,
    Gradients = 2,
    Tensor = 3,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Self::Broadcast => "broadcast of the model's parameters",
            Self::Gradients => "all-reduce of the gradients",
            Self::Tensor => "all-reduce of a tensor",
        }
    }

    fn from_code(code: u64) -> Option<Self> {
        match code {
            1 => Some(Self::Broadcast),
            2 => Some(Self::Gradients),
            3 => Some(Self::Tensor),
            _ => None,
        }
    }
}

/// What a rank is about to exchange, compared across ranks before the data is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    op: u64,
    root: u64,
    values: u64,
    tensors: u64,
    shapes_hash: u64,
    /// `k + 1` where this rank cannot take part because of its parameter `k` (a quantized
    /// parameter of a broadcast's root); 0 where it can.
    refused: u64,
    /// The first tensor's shape (its first [`HEADER_DIMS`] dims), for the message.
    first_shape: Vec<u64>,
}

/// Dims of the first shape a header carries.
const HEADER_DIMS: usize = 4;

/// Each field of a header and its 16-bit chunks.
const HEADER_FIELDS: [usize; 7 + HEADER_DIMS] = [1, 2, 3, 2, 4, 2, 1, 2, 2, 2, 2];

/// Values per rank in the header exchange: each field in 16-bit chunks, exact in f32 (the
/// exchange is a sum in which every other rank contributes zeros).
const HEADER_LEN: usize = {
    let mut sum = 0;
    let mut i = 0;
    while i < HEADER_FIELDS.len() {
        sum += HEADER_FIELDS[i];
        i += 1;
    }
    sum
};

impl Header {
    fn new(op: Op, root: u32, shapes: &[Vec<usize>]) -> Self {
        // FNV-1a over the shapes, with the rank of each.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for shape in shapes {
            for word in std::iter::once(shape.len()).chain(shape.iter().copied()) {
                for byte in (word as u64).to_le_bytes() {
                    hash ^= u64::from(byte);
                    hash = hash.wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        Self {
            op: op as u64,
            root: u64::from(root),
            values: shapes
                .iter()
                .map(|s| s.iter().product::<usize>() as u64)
                .sum(),
            tensors: shapes.len() as u64,
            shapes_hash: hash,
            refused: 0,
            first_shape: shapes.first().map_or(Vec::new(), |s| {
                s.iter().take(HEADER_DIMS).map(|d| *d as u64).collect()
            }),
        }
    }

    fn fields(&self) -> [u64; HEADER_FIELDS.len()] {
        let mut out = [0; HEADER_FIELDS.len()];
        out[..7].copy_from_slice(&[
            self.op,
            self.root,
            self.values,
            self.tensors,
            self.shapes_hash,
            self.refused,
            self.first_shape.len() as u64,
        ]);
        out[7..7 + self.first_shape.len()].copy_from_slice(&self.first_shape);
        out
    }

    fn encode(&self) -> [f32; HEADER_LEN] {
        let mut out = [0f32; HEADER_LEN];
        let mut i = 0;
        for (value, chunks) in self.fields().into_iter().zip(HEADER_FIELDS) {
            for c in 0..chunks {
                out[i] = ((value >> (16 * c)) & 0xffff) as f32;
                i += 1;
            }
        }
        out
    }

    fn decode(values: &[f32]) -> Option<Self> {
        let mut fields = [0u64; HEADER_FIELDS.len()];
        let mut i = 0;
        for (field, chunks) in fields.iter_mut().zip(HEADER_FIELDS) {
            for c in 0..chunks {
                let v = *values.get(i)?;
                i += 1;
                if !(0.0..=65535.0).contains(&v) || v.fract() != 0.0 {
                    return None;
                }
                *field |= (v as u64) << (16 * c);
            }
        }
        let dims = usize::try_from(fields[6])
            .ok()
            .filter(|d| *d <= HEADER_DIMS)?;
        Some(Self {
            op: fields[0],
            root: fields[1],
            values: fields[2],
            tensors: fields[3],
            shapes_hash: fields[4],
            refused: fields[5],
            first_shape: fields[7..7 + dims].to_vec(),
        })
    }

    fn describe(&self) -> String {
        let Some(op) = Op::from_code(self.op) else {
            return "no call".into();
        };
        let plural = |n: u64, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
        let mut s = format!("{}: {}", op.name(), plural(self.values, "value"));
        if op == Op::Tensor {
            let _ = write!(s, " of shape {:?}", self.first_shape);
        } else {
            let _ = write!(
                s,
                " in {} (the first of shape {:?}; shapes hash {:016x})",
                plural(self.tensors, "parameter"),
                self.first_shape,
                self.shapes_hash
            );
        }
        if op == Op::Broadcast {
            let _ = write!(s, " from root {}", self.root);
        }
        s
    }
}

/// The inner backend every collective call is made on.
type Inner<T> = OffloadBackend<T>;

/// This process's place in a data-parallel run: registered with burn-collective, it makes the
/// collective calls of one rank. Create with [`register`](Self::register).
pub struct CollectiveRank<T: OffloadTarget> {
    setup: CollectiveSetup,
    device: OffloadDevice<T::Device>,
    failed: OnceLock<OffloadError>,
    finished: bool,
}

impl<T: OffloadTarget> std::fmt::Debug for CollectiveRank<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollectiveRank")
            .field("setup", &self.setup)
            .field("failed", &self.failed.get())
            .finish()
    }
}

impl<T: OffloadTarget> CollectiveRank<T> {
    /// Registers this process as rank `setup.rank()` on `device` (its compute device: the
    /// model's, `OffloadDevice::Device(d)`), and waits for every rank to register (at most
    /// the setup's timeout). The orchestrator must be running, or start within the timeout.
    pub fn register(
        setup: CollectiveSetup,
        device: &OffloadDevice<T::Device>,
    ) -> Result<Self, OffloadError> {
        let config = setup.collective_config()?;
        let once = || OffloadError::CollectiveSetup {
            reason: "this process has registered a rank already: burn-collective allows one \
                     registration per process (its state is process-wide); run each rank in a \
                     process of its own"
                .into(),
        };
        if REGISTERED.load(Ordering::SeqCst) {
            return Err(once());
        }
        // burn-collective logs a failed bind of the data service and goes on: check first.
        TcpListener::bind(("0.0.0.0", setup.data_port)).map_err(|e| {
            OffloadError::CollectiveSetup {
                reason: format!(
                    "rank {}'s data port {} cannot be listened on ({e}): give each rank on a \
                     machine its own free port",
                    setup.rank, setup.data_port
                ),
            }
        })?;
        if REGISTERED.swap(true, Ordering::SeqCst) {
            return Err(once());
        }
        let rank = Self {
            device: device.to_resident(),
            setup,
            failed: OnceLock::new(),
            finished: false,
        };
        let peer = rank.peer();
        let device = rank.device.clone();
        rank.call("registration", rank.deadline(), move || {
            burn_collective::register::<Inner<T>>(peer, device, config)
        })?;
        Ok(rank)
    }

    /// The setup this rank registered with.
    pub fn setup(&self) -> &CollectiveSetup {
        &self.setup
    }

    /// The first error a call of this rank ended with, if any (every later call returns it).
    pub fn failure(&self) -> Option<&OffloadError> {
        self.failed.get()
    }

    /// Gives every parameter of `module` the value it has on rank `root`: call it on every
    /// rank, with the same `root`, before training. The root's module is returned as it is;
    /// on the other ranks parameter ids, gradient flags and placement stay: a parameter the
    /// rank keeps in host memory (its policy's, or placed with [`OffloadContext::place`])
    /// gets the new value in host memory of its model's context, and lazy parameters are
    /// loaded without being initialised (as with `Module::load_record`). The values travel in
    /// chunks of [`CollectiveSetup::chunk_bytes`], each placed as soon as it arrives: the
    /// device holds about one chunk beyond the parameters it keeps. The ranks' models must have
    /// the same parameter shapes in the same order ([`OffloadError::CollectiveMismatch`]
    /// otherwise), and the root's must be float (not quantized).
    pub fn broadcast_module<AB, M>(&self, module: M, root: u32) -> Result<M, OffloadError>
    where
        AB: AutodiffBackend<InnerBackend = Inner<T>, Device = OffloadDevice<T::Device>>,
        M: Module<AB>,
    {
        let op = "broadcast";
        if root >= self.setup.world_size {
            return Err(OffloadError::CollectiveSetup {
                reason: format!(
                    "broadcast from root {root} in a world of {}: the root is a rank, 0..{}",
                    self.setup.world_size, self.setup.world_size
                ),
            });
        }
        let is_root = root == self.setup.rank;
        let mut gather = Gather::<T> {
            root: is_root,
            slots: Vec::new(),
            refused: None,
        };
        module.visit(&mut gather);
        let slots = gather.slots;
        let shapes: Vec<Vec<usize>> = slots.iter().map(|s| s.shape.clone()).collect();
        let mut header = Header::new(Op::Broadcast, root, &shapes);
        header.refused = gather.refused.map_or(0, |i| i as u64 + 1);
        let deadline = self.deadline();
        self.agree(op, &header, deadline)?;
        let sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        if is_root {
            // The root sends; its parameters stay as they are. The others send negative zeros:
            // `x + -0.0` is `x` for every `x`, so every rank gets the root's values bit for bit.
            self.exchange_all(
                op,
                &sizes,
                ReduceOperation::Sum,
                deadline,
                |p, start, len| {
                    let value = slots[p]
                        .value
                        .as_ref()
                        .expect("the root gathered its values");
                    value.clone().narrow(0, start, len)
                },
                |_, _| {},
            )?;
            return Ok(module);
        }
        let mut received: Vec<Option<Tensor<Inner<T>, 1>>> = vec![None; slots.len()];
        self.exchange_all(
            op,
            &sizes,
            ReduceOperation::Sum,
            deadline,
            |_, _, len| Tensor::full([len], -0.0f32, &self.device),
            |p, value| {
                let value = if slots[p].dtype == DType::F32 {
                    value
                } else {
                    value.cast(slots[p].dtype)
                };
                received[p] = Some(match &slots[p].host {
                    // Into host memory as it arrives: the device holds one chunk at a time.
                    Some((context, host)) => context.place(value, host),
                    None => value,
                });
            },
        )?;
        let mut scatter = Scatter::<T, _> {
            slots: slots.into_iter().zip(received),
            device: self.device.clone(),
        };
        Ok(module.map(&mut scatter))
    }

    /// Replaces the gradient of each parameter of `module` in `grads` by its mean over the
    /// ranks (what the gradient of the mean loss over all ranks' batches is, when the ranks'
    /// batches are of equal size). Call it on every rank after the backward pass, before the
    /// optimizer step. A parameter without a gradient on some ranks counts as a zero gradient
    /// there; one without a gradient on every rank gets none. Gradients in `grads` of
    /// parameters that are not `module`'s are left as they are.
    ///
    /// The gradients are sent in module order, not by parameter id (ids differ between ranks
    /// whose models were initialised separately), as one vector in chunks of
    /// [`CollectiveSetup::chunk_bytes`]: a step makes one exchange per chunk, whatever the
    /// number of parameters, and the device holds about one chunk beyond the gradients.
    pub fn all_reduce_grads<AB, M>(
        &self,
        mut grads: GradientsParams,
        module: &M,
    ) -> Result<GradientsParams, OffloadError>
    where
        AB: AutodiffBackend<InnerBackend = Inner<T>, Device = OffloadDevice<T::Device>>,
        M: Module<AB>,
    {
        let op = "gradient all-reduce";
        let mut take = TakeGrads::<T> {
            grads: &mut grads,
            shapes: Vec::new(),
            dtypes: Vec::new(),
            taken: Vec::new(),
        };
        module.visit(&mut take);
        let TakeGrads {
            shapes,
            dtypes,
            mut taken,
            ..
        } = take;
        let header = Header::new(Op::Gradients, 0, &shapes);
        let deadline = self.deadline();
        self.agree(op, &header, deadline)?;
        // After the gradients, one flag per parameter: 1 where this rank has a gradient (the
        // mean is > 0 where any rank has one).
        let count = shapes.len();
        let flags: Vec<f32> = taken
            .iter()
            .map(|g| if g.is_some() { 1.0 } else { 0.0 })
            .collect();
        let flags_in = Tensor::<Inner<T>, 1>::from_floats(flags.as_slice(), &self.device);
        let mut sizes: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        sizes.push(count);
        let mut reduced: Vec<Option<Tensor<Inner<T>, 1>>> = vec![None; count + 1];
        self.exchange_all(
            op,
            &sizes,
            ReduceOperation::Mean,
            deadline,
            |p, start, len| {
                if p == count {
                    return flags_in.clone().narrow(0, start, len);
                }
                let piece = match &taken[p] {
                    Some(grad) => grad.clone().narrow(0, start, len),
                    None => Tensor::zeros([len], &self.device),
                };
                if start + len == sizes[p] {
                    // Sent: free this rank's gradient now.
                    taken[p] = None;
                }
                piece
            },
            |p, value| reduced[p] = Some(value),
        )?;
        let flags = match reduced[count].take() {
            Some(flags) => flags
                .into_data()
                .to_vec::<f32>()
                .map_err(|e| self.fail(op, format!("cannot read the result: {e:?}")))?,
            None => Vec::new(),
        };
        let mut put = PutGrads::<T, _> {
            grads: &mut grads,
            reduced: reduced.into_iter(),
            shapes: shapes.iter(),
            dtypes: dtypes.iter(),
            flags: flags.iter(),
            device: self.device.clone(),
        };
        module.visit(&mut put);
        Ok(grads)
    }

    /// The mean of `tensor` over the ranks, in device memory. Every rank must call it with a
    /// tensor of the same shape ([`OffloadError::CollectiveMismatch`] otherwise).
    pub fn all_reduce_mean<const D: usize>(
        &self,
        tensor: Tensor<Inner<T>, D>,
    ) -> Result<Tensor<Inner<T>, D>, OffloadError> {
        let op = "tensor all-reduce";
        let shape = tensor.shape();
        let header = Header::new(Op::Tensor, 0, std::slice::from_ref(&shape.to_vec()));
        let deadline = self.deadline();
        self.agree(op, &header, deadline)?;
        let n = shape.num_elements();
        let dtype = tensor.dtype();
        let flat = tensor.reshape([n]);
        let mut result = None;
        self.exchange_all(
            op,
            &[n],
            ReduceOperation::Mean,
            deadline,
            |_, start, len| flat.clone().narrow(0, start, len),
            |_, value| result = Some(value),
        )?;
        Ok(match result {
            Some(value) => value.cast(dtype).reshape(shape),
            None => Tensor::zeros(shape, &self.device),
        })
    }

    /// Unregisters this rank (burn-collective's `finish_collective`): call it on every rank
    /// once training is done.
    pub fn finish(mut self) -> Result<(), OffloadError> {
        self.finished = true;
        let peer = self.peer();
        self.call("finish", self.deadline(), move || {
            burn_collective::finish_collective::<Inner<T>>(peer)
        })
    }

    fn peer(&self) -> PeerId {
        PeerId(self.setup.rank)
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.setup.timeout
    }

    /// Exchanges the concatenation of the parameters of `sizes` (values each, in order), in
    /// chunks of at most the setup's chunk size: `input(p, start, len)` gives values
    /// `start..start + len` of parameter `p`, flattened; `output(p, value)` gets the result
    /// for parameter `p` (f32) once its last chunk has arrived. Parameters without values get
    /// no output. Every rank cuts the same chunks (the headers agreed on the sizes).
    fn exchange_all(
        &self,
        op: &str,
        sizes: &[usize],
        reduce: ReduceOperation,
        deadline: Instant,
        mut input: impl FnMut(usize, usize, usize) -> Tensor<Inner<T>, 1>,
        mut output: impl FnMut(usize, Tensor<Inner<T>, 1>),
    ) -> Result<(), OffloadError> {
        let total: usize = sizes.iter().sum();
        let world = self.setup.world_size as usize;
        let chunk = (self.setup.chunk_bytes / 4).max(world);
        // Where the next chunk starts reading, and where its result goes.
        let (mut read, mut read_at) = (0usize, 0usize);
        let (mut write, mut write_at) = (0usize, 0usize);
        let mut pending: Vec<Tensor<Inner<T>, 1>> = Vec::new();
        let mut start = 0;
        while start < total {
            let len = chunk.min(total - start);
            let mut pieces = Vec::new();
            let mut need = len;
            while need > 0 {
                while read_at == sizes[read] {
                    (read, read_at) = (read + 1, 0);
                }
                let take = need.min(sizes[read] - read_at);
                let piece = input(read, read_at, take);
                pieces.push(if piece.dtype() == DType::F32 {
                    piece
                } else {
                    piece.cast(DType::F32)
                });
                read_at += take;
                need -= take;
            }
            // burn-collective's ring all-reduce cuts the vector in one slice per rank.
            if len < world {
                pieces.push(Tensor::zeros([world - len], &self.device));
            }
            let result = self.exchange(op, Tensor::cat(pieces, 0), reduce, deadline)?;
            let mut at = 0;
            while at < len {
                while write_at == sizes[write] {
                    (write, write_at) = (write + 1, 0);
                }
                let take = (len - at).min(sizes[write] - write_at);
                pending.push(result.clone().narrow(0, at, take));
                at += take;
                write_at += take;
                if write_at == sizes[write] {
                    let value = if pending.len() == 1 {
                        pending.pop().expect("one piece")
                    } else {
                        Tensor::cat(std::mem::take(&mut pending), 0)
                    };
                    output(write, value);
                }
            }
            start += len;
        }
        Ok(())
    }

    /// Exchanges `header` with every rank (a sum in which each rank fills its own slot) and
    /// checks that all are equal and that every rank can take part; if not, every rank fails
    /// with the same description, before any data is exchanged.
    fn agree(&self, op: &str, header: &Header, deadline: Instant) -> Result<(), OffloadError> {
        let world = self.setup.world_size as usize;
        let mut slots = vec![0f32; world * HEADER_LEN];
        let rank = self.setup.rank as usize;
        slots[rank * HEADER_LEN..(rank + 1) * HEADER_LEN].copy_from_slice(&header.encode());
        let slots = Tensor::<Inner<T>, 1>::from_floats(slots.as_slice(), &self.device);
        let all = self.exchange(op, slots, ReduceOperation::Sum, deadline)?;
        let all = all
            .into_data()
            .to_vec::<f32>()
            .map_err(|e| self.fail(op, format!("cannot read the header exchange: {e:?}")))?;
        let headers: Vec<Option<Header>> = all.chunks(HEADER_LEN).map(Header::decode).collect();
        let refusals: Vec<String> = headers
            .iter()
            .enumerate()
            .filter_map(|(r, h)| {
                let h = h.as_ref()?;
                (h.refused > 0).then(|| {
                    format!(
                        "rank {r} cannot send its parameter #{} (in module order): it is \
                         quantized; broadcast float parameters (before quantizing), or load \
                         the same checkpoint on every rank",
                        h.refused - 1
                    )
                })
            })
            .collect();
        if !refusals.is_empty() {
            return Err(self.fail(op, refusals.join("; ")));
        }
        if headers.iter().all(|h| h.as_ref() == Some(header)) {
            return Ok(());
        }
        let mut details = String::new();
        for (r, h) in headers.iter().enumerate() {
            let _ = write!(
                details,
                "{}rank {r}: {}",
                if r == 0 { "" } else { "; " },
                h.as_ref()
                    .map_or("an unreadable header".to_string(), Header::describe)
            );
        }
        let error = OffloadError::CollectiveMismatch {
            op: op.to_string(),
            rank: self.setup.rank,
            details,
        };
        let _ = self.failed.set(error.clone());
        Err(error)
    }

    /// One burn-collective all-reduce of `flat`, bounded by `deadline`; checks the result's
    /// shape.
    fn exchange(
        &self,
        op: &str,
        flat: Tensor<Inner<T>, 1>,
        reduce: ReduceOperation,
        deadline: Instant,
    ) -> Result<Tensor<Inner<T>, 1>, OffloadError> {
        let len = flat.dims()[0];
        let primitive = flat.into_primitive().tensor();
        let peer = self.peer();
        let result = self.call(op, deadline, move || {
            burn_collective::all_reduce::<Inner<T>>(peer, primitive, reduce)
        })?;
        let shape = result.shape().to_vec();
        if shape != [len] {
            return Err(self.fail(
                op,
                format!(
                    "burn-collective returned shape {shape:?} for a vector of {len} values: a \
                     peer sent a tensor of another size"
                ),
            ));
        }
        Ok(Tensor::from_primitive(TensorPrimitive::Float(result)))
    }

    /// Records `reason` as this rank's failure and returns it as an error.
    fn fail(&self, op: &str, reason: String) -> OffloadError {
        let error = OffloadError::Collective {
            op: op.to_string(),
            rank: Some(self.setup.rank),
            reason,
        };
        let _ = self.failed.set(error.clone());
        error
    }

    /// Runs the blocking burn-collective call `f` on a helper thread and waits for it until
    /// `deadline`. On a timeout the helper thread is left blocked (burn-collective has no way
    /// to cancel a call), and the rank is marked failed.
    fn call<R: Send + 'static>(
        &self,
        op: &str,
        deadline: Instant,
        f: impl FnOnce() -> Result<R, CollectiveError> + Send + 'static,
    ) -> Result<R, OffloadError> {
        if let Some(error) = self.failed.get() {
            return Err(error.clone());
        }
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("burn-offload-collective-{}", self.setup.rank))
            .spawn(move || {
                let _ = tx.send(f());
            });
        if let Err(e) = spawned {
            return Err(self.fail(op, format!("cannot start a helper thread: {e}")));
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(error)) => Err(self.fail(op, explain(&error, &self.setup))),
            Err(RecvTimeoutError::Disconnected) => Err(self.fail(
                op,
                "burn-collective panicked in this process (see the panic message above): a \
                 peer process probably died or closed its connection; check the other ranks' \
                 output"
                    .into(),
            )),
            Err(RecvTimeoutError::Timeout) => {
                let error = OffloadError::CollectiveTimeout {
                    op: op.to_string(),
                    rank: self.setup.rank,
                    timeout_s: self.setup.timeout.as_secs_f64(),
                };
                let _ = self.failed.set(error.clone());
                Err(error)
            }
        }
    }
}

impl<T: OffloadTarget> Drop for CollectiveRank<T> {
    fn drop(&mut self) {
        if !self.finished && self.failed.get().is_none() && !std::thread::panicking() {
            log::warn!(
                "collective rank {} dropped without `finish`: the other ranks may wait for it \
                 until their timeout",
                self.setup.rank
            );
        }
    }
}

/// What a burn-collective error means and what to check.
fn explain(error: &CollectiveError, setup: &CollectiveSetup) -> String {
    let world = setup.world_size;
    match error {
        CollectiveError::InvalidConfig => {
            "burn-collective refused the configuration (its global settings are partly set)".into()
        }
        CollectiveError::MultipleRegister => {
            "this rank registered twice: register each rank once".into()
        }
        CollectiveError::MultipleUnregister => "this rank finished twice".into(),
        CollectiveError::RegisterParamsMismatch => {
            "the registration differs from an earlier one in this process: give every \
             registration the same setup"
                .into()
        }
        CollectiveError::AllReduceShapeMismatch
        | CollectiveError::ReduceShapeMismatch
        | CollectiveError::AllReduceOperationMismatch
        | CollectiveError::ReduceOperationMismatch
        | CollectiveError::ReduceRootMismatch
        | CollectiveError::BroadcastRootMismatch
        | CollectiveError::BroadcastNoTensor
        | CollectiveError::BroadcastMultipleTensors => format!(
            "the devices of this process disagree on the operation ({error:?}): every rank \
             must make the same calls in the same order"
        ),
        CollectiveError::LocalServerMissing => {
            "burn-collective's server in this process stopped (it panics when a peer cannot \
             be reached or closes its connection: see the panic message above): a peer \
             process probably died; check the other ranks' output"
                .into()
        }
        CollectiveError::RegisterNotFirstOperation => {
            "a collective call before the registration completed".into()
        }
        CollectiveError::Global(global) => {
            // burn-collective does not export the type of `global`: its variants by name.
            let debug = format!("{global:?}");
            let name = debug.split(['(', ' ', '{']).next().unwrap_or_default();
            match name {
                "OrchestratorUnreachable" => format!(
                    "the orchestrator at {} cannot be reached: start it first (`Orchestrator`) \
                     and check the address and port",
                    setup.orchestrator_address()
                ),
                "RegisterParamsMismatch" => format!(
                    "the ranks registered with different world sizes (this one: {world}): give \
                     every rank the same world size"
                ),
                "DoubleRegister" => format!(
                    "another rank registered with this rank's address {}: give each rank its \
                     own host:port",
                    setup.node_address()
                ),
                "PeerLost" => format!(
                    "a peer closed its connection during the exchange ({debug}): it died or \
                     finished early; check the other ranks' output"
                ),
                "PeerSentIncoherentTensor" => "a peer sent a tensor of another shape".into(),
                "RingReduceImpossible" => {
                    format!("a vector shorter than the {world} ranks cannot be ring-reduced")
                }
                "AllReduceParamsMismatch" => {
                    "the ranks asked for different all-reduce strategies".into()
                }
                "NotRegisteredOnFinish" | "PendingRegisterOnFinish" => {
                    format!("finish before the registration completed ({debug})")
                }
                _ => format!("burn-collective's global layer failed: {debug}"),
            }
        }
        CollectiveError::Other(message) => format!("burn-collective failed: {message}"),
    }
}

/// The host-memory context of a tensor, if it lives in host memory.
fn host_context<T: OffloadTarget, const D: usize>(
    value: Tensor<Inner<T>, D>,
) -> Option<OffloadContext> {
    match value.into_primitive() {
        TensorPrimitive::Float(tensor) => tensor.offloaded().map(|o| o.context().clone()),
        TensorPrimitive::QFloat(_) => None,
    }
}

/// A parameter of the module being broadcast.
struct Slot<T: OffloadTarget> {
    shape: Vec<usize>,
    dtype: DType,
    /// Where its new value goes: host memory of this context, on this (host) device; `None`:
    /// device memory.
    host: Option<(OffloadContext, OffloadDevice<T::Device>)>,
    /// The root's value, flattened (on the root only).
    value: Option<Tensor<Inner<T>, 1>>,
}

/// Collects each float parameter's shape, where its new value goes, and on the root its value,
/// in module order.
struct Gather<T: OffloadTarget> {
    root: bool,
    slots: Vec<Slot<T>>,
    /// The index of a quantized parameter of the root, if any.
    refused: Option<usize>,
}

impl<AB, T> ModuleVisitor<AB> for Gather<T>
where
    T: OffloadTarget,
    AB: AutodiffBackend<InnerBackend = Inner<T>, Device = OffloadDevice<T::Device>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let initialized = param.is_initialized();
        let (shape, dtype) = if initialized {
            let value = param.val();
            (value.shape().to_vec(), value.dtype())
        } else {
            let dtype = burn_backend::get_device_settings::<AB>(&param.lazy_device())
                .float_dtype
                .into();
            (param.lazy_shape().to_vec(), dtype)
        };
        let n = shape.iter().product::<usize>();
        let mut value = None;
        let mut host = None;
        if self.root {
            let inner = param.val().inner();
            if matches!(inner.dtype(), DType::QFloat(_)) {
                self.refused.get_or_insert(self.slots.len());
            } else {
                value = Some(inner.reshape([n]));
            }
        } else {
            // A policy's mark says where loads go; else a value in host memory stays there.
            let device = param.lazy_device().to_host();
            host = crate::policy::marked_host_context(param)
                .or_else(|| {
                    initialized
                        .then(|| host_context::<T, D>(param.val().inner()))
                        .flatten()
                })
                .map(|context| (context, device));
        }
        self.slots.push(Slot {
            shape,
            dtype,
            host,
            value,
        });
    }
}

/// Writes the received values into the parameters, in module order, keeping each one's id,
/// gradient flag, load mapper and placement.
struct Scatter<T: OffloadTarget, I> {
    slots: I,
    device: OffloadDevice<T::Device>,
}

impl<AB, T, I> ModuleMapper<AB> for Scatter<T, I>
where
    T: OffloadTarget,
    AB: AutodiffBackend<InnerBackend = Inner<T>, Device = OffloadDevice<T::Device>>,
    I: Iterator<Item = (Slot<T>, Option<Tensor<Inner<T>, 1>>)>,
{
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<AB, D>>) -> Param<Tensor<AB, D>> {
        let (slot, value) = self
            .slots
            .next()
            .expect("the module has the parameters it had when gathered");
        let shape = Shape::from(slot.shape);
        let value: Tensor<Inner<T>, D> = match value {
            Some(value) => value.reshape(shape),
            // No values: nothing was sent for it.
            None => Tensor::<Inner<T>, D>::zeros(shape, &self.device).cast(slot.dtype),
        };
        let id = param.id;
        // As `Module::load_record` loads: a policy's mark keeps the value in host memory of the
        // model's context (a value already there is re-tagged), a lazy parameter is not
        // initialised.
        let loaded = param.transform_for_load(Tensor::from_inner(value), id);
        match slot.host {
            Some((context, device)) => loaded.map(|value| {
                if querying_placement(|| value.device()).is_host() {
                    value
                } else {
                    context.place(value, &device)
                }
            }),
            None => loaded,
        }
    }
}

/// Takes each parameter's gradient (flattened) out of `grads`, in module order, with the
/// parameter's shape and the gradient's dtype (the parameter's where it has none).
struct TakeGrads<'a, T: OffloadTarget> {
    grads: &'a mut GradientsParams,
    shapes: Vec<Vec<usize>>,
    dtypes: Vec<DType>,
    taken: Vec<Option<Tensor<Inner<T>, 1>>>,
}

impl<AB, T> ModuleVisitor<AB> for TakeGrads<'_, T>
where
    T: OffloadTarget,
    AB: AutodiffBackend<InnerBackend = Inner<T>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let (shape, dtype) = if param.is_initialized() {
            let value = param.val();
            (value.shape().to_vec(), value.dtype())
        } else {
            (param.lazy_shape().to_vec(), DType::F32)
        };
        let n = shape.iter().product::<usize>();
        let grad = self.grads.remove::<Inner<T>, D>(param.id);
        self.dtypes.push(grad.as_ref().map_or(dtype, |g| g.dtype()));
        self.taken.push(grad.map(|grad| grad.reshape([n])));
        self.shapes.push(shape);
    }
}

/// Registers the reduced gradients back, in module order, where any rank had one.
struct PutGrads<'a, T: OffloadTarget, R> {
    grads: &'a mut GradientsParams,
    reduced: R,
    shapes: std::slice::Iter<'a, Vec<usize>>,
    dtypes: std::slice::Iter<'a, DType>,
    flags: std::slice::Iter<'a, f32>,
    device: OffloadDevice<T::Device>,
}

impl<AB, T, R> ModuleVisitor<AB> for PutGrads<'_, T, R>
where
    T: OffloadTarget,
    AB: AutodiffBackend<InnerBackend = Inner<T>>,
    R: Iterator<Item = Option<Tensor<Inner<T>, 1>>>,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
        let shape = Shape::from(self.shapes.next().expect("a shape per parameter").clone());
        let dtype = *self.dtypes.next().expect("a dtype per parameter");
        let reduced = self.reduced.next().expect("a result per parameter");
        let any = self.flags.next().is_some_and(|flag| *flag > 0.0);
        if any {
            let grad: Tensor<Inner<T>, D> = match reduced {
                Some(grad) => grad.reshape(shape),
                // No values to send.
                None => Tensor::zeros(shape, &self.device),
            };
            let grad = if grad.dtype() == dtype {
                grad
            } else {
                grad.cast(dtype)
            };
            self.grads.register(param.id, grad);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_differ_by_shape() {
        let a = Header::new(Op::Gradients, 0, &[vec![8, 16], vec![16]]);
        assert_eq!(Header::decode(&a.encode()), Some(a.clone()));
        assert_eq!(a.values, 144);
        assert_eq!(a.tensors, 2);
        let b = Header::new(Op::Gradients, 0, &[vec![16, 8], vec![16]]);
        assert_eq!(b.values, a.values);
        assert_ne!(Header::decode(&b.encode()), Some(a.clone()));
        let big = Header::new(Op::Broadcast, 70_000, &[vec![1 << 20, 1 << 20], vec![3]]);
        assert_eq!(Header::decode(&big.encode()), Some(big.clone()));
        let described = big.describe();
        assert!(
            described.starts_with(
                "broadcast of the model's parameters: 1099511627779 values in 2 parameters (the \
                 first of shape [1048576, 1048576]; shapes hash "
            ) && described.ends_with(" from root 70000"),
            "{described}"
        );
        let tensor = Header::new(Op::Tensor, 0, &[vec![1, 2, 3, 4, 5]]);
        assert_eq!(Header::decode(&tensor.encode()), Some(tensor.clone()));
        assert_eq!(
            tensor.describe(),
            "all-reduce of a tensor: 120 values of shape [1, 2, 3, 4]"
        );
        // A slot no rank filled (all zeros) is no header of an operation.
        let empty = Header::decode(&[0.0; HEADER_LEN]).unwrap();
        assert_eq!(empty.describe(), "no call");
        assert_eq!(Header::decode(&[0.5; HEADER_LEN]), None);
    }

    #[test]
    fn setups_are_checked() {
        let ok = CollectiveSetup::new(1, 2, "127.0.0.1:3000", "127.0.0.1", 3001);
        assert!(ok.collective_config().is_ok());
        assert_eq!(ok.orchestrator_address(), "ws://127.0.0.1:3000");
        assert_eq!(ok.node_address(), "ws://127.0.0.1:3001");
        for (bad, says) in [
            (
                CollectiveSetup::new(2, 2, "127.0.0.1:3000", "h", 1),
                "ranks are 0..2",
            ),
            (
                CollectiveSetup::new(0, 0, "127.0.0.1:3000", "h", 1),
                "world size of 0",
            ),
            (
                CollectiveSetup::new(0, 1, "127.0.0.1", "h", 1),
                "give host:port",
            ),
            (
                CollectiveSetup::new(0, 1, "h:1", "ws://h:2", 1),
                "node host",
            ),
            (CollectiveSetup::new(0, 1, "h:1", "h", 0), "data port 0"),
            (
                CollectiveSetup::new(0, 1, "h:1", "h", 1).chunk_bytes(3),
                "holds no f32 value",
            ),
            (
                CollectiveSetup::new(0, 1, "h:1", "h", 1).timeout(Duration::ZERO),
                "timeout of 0",
            ),
        ] {
            let error = bad.collective_config().unwrap_err();
            assert!(
                matches!(error, OffloadError::CollectiveSetup { .. }),
                "{error:?}"
            );
            assert!(error.to_string().contains(says), "{error}");
        }
    }
}
