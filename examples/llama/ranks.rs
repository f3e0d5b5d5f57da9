//! `llama train --ranks N`: data-parallel training over burn-collective on this machine.
//!
//! ```text
//! cargo run --release --features collective --example llama -- \
//!     train --preset tiny --offload-gb 1 --state host --ranks 2
//! ```
//!
//! The process started by the user is the launcher: it runs burn-collective's orchestrator on a
//! free port of 127.0.0.1 and starts `N` processes of the same command line, each told its rank
//! (`--rank`, `--orchestrator`, `--data-port`: hidden options). Each rank builds the model and
//! places it by the same options (its own policy, in its own process, on its own device: on
//! CUDA device `rank % device count`), registers, takes rank 0's weights
//! ([`CollectiveRank::broadcast_module`]) and, at each step, trains on its slice of the step's
//! `--batch` sequences (rank `r` of `N` takes sequences `r * batch / N ..`), averages the
//! gradients over the ranks ([`CollectiveRank::all_reduce_grads`]) before its optimizer step,
//! and logs the mean loss over the ranks: the same windows and, up to rounding, the same
//! losses as one process training on the whole batch. At the end every rank prints a digest of
//! its parameters' bits; the launcher checks that they are all equal.
//!
//! Rank 0's output is the launcher's; the other ranks' output is printed only if they fail. A
//! rank that fails ends the run: the launcher stops the others and says which failed and why.

use std::error::Error;
use std::process::{Command, ExitCode};
use std::time::Duration;
// The launcher's (feature `collective`).
#[cfg(feature = "collective")]
use std::{
    io::{BufRead, BufReader, Read},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::Instant,
};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use burn_offload::OffloadDevice;
use burn_offload::inner::OffloadTarget;
use serde::{Deserialize, Serialize};

use super::train::TrainArgs;

/// The line prefix of a rank's result (one JSON object), printed last by each rank.
const RESULT_PREFIX: &str = "rank result: ";

/// What a rank reports when it is done.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RankResult {
    /// The rank.
    pub rank: u32,
    /// FNV-1a digest of its parameters' bits, in module order.
    pub digest: String,
    /// Each step's loss, the mean over the ranks.
    pub losses: Vec<f32>,
}

impl RankResult {
    /// The line that carries it.
    pub fn line(&self) -> String {
        format!(
            "{RESULT_PREFIX}{}",
            serde_json::to_string(self).expect("a rank result serialises")
        )
    }
}

/// What a data-parallel run gave.
#[derive(Debug)]
#[cfg_attr(not(feature = "collective"), allow(dead_code))]
pub(super) struct RanksRun {
    /// Each rank's result, by rank.
    pub results: Vec<RankResult>,
    /// From the launch to the last rank's end.
    pub wall: Duration,
}

/// The sequences of each step's batch that rank `rank` of `ranks` trains on.
pub(super) fn slice(batch: usize, rank: usize, ranks: usize) -> std::ops::Range<usize> {
    let per = batch / ranks;
    rank * per..(rank + 1) * per
}

/// Checks `--ranks` against the batch.
pub(super) fn check(train: &TrainArgs) -> Result<(), Box<dyn Error>> {
    if train.ranks == 0 {
        return Err("--ranks must be at least 1".into());
    }
    if !train.batch.is_multiple_of(train.ranks) {
        return Err(format!(
            "--batch {} is not a multiple of --ranks {}: each rank trains on --batch / --ranks \
             sequences of every step's batch; give a --batch that is",
            train.batch, train.ranks
        )
        .into());
    }
    if let Some(rank) = train.rank
        && rank as usize >= train.ranks
    {
        return Err(format!("--rank {rank} of --ranks {}", train.ranks).into());
    }
    if !(train.collective_timeout.is_finite() && train.collective_timeout > 0.0) {
        return Err(format!(
            "--collective-timeout {}: give a number of seconds > 0",
            train.collective_timeout
        )
        .into());
    }
    Ok(())
}

#[cfg(feature = "collective")]
/// A port of 127.0.0.1 nothing listens on now (burn-collective's servers bind every interface).
fn free_port() -> Result<u16, Box<dyn Error>> {
    Ok(std::net::TcpListener::bind(("0.0.0.0", 0))?
        .local_addr()?
        .port())
}

#[cfg(feature = "collective")]
/// A rank's process and what it has printed so far.
struct RankProcess {
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

#[cfg(feature = "collective")]
/// Kills the rank processes (those that have ended already are only reaped).
fn stop(ranks: &mut [RankProcess]) {
    for process in ranks {
        let _ = process.child.kill();
        let _ = process.child.wait();
    }
}

#[cfg(feature = "collective")]
/// Copies `from` line by line into `output`, and onto this process's stdout (`Some(false)`) or
/// stderr (`Some(true)`) where asked; result lines are kept but not echoed.
fn pump(
    from: impl Read + Send + 'static,
    output: Arc<Mutex<String>>,
    echo: Option<bool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            match echo {
                Some(false) if !line.starts_with(RESULT_PREFIX) => println!("{line}"),
                Some(true) => eprintln!("{line}"),
                _ => {}
            }
            let mut out = output.lock().unwrap_or_else(|p| p.into_inner());
            out.push_str(&line);
            out.push('\n');
        }
    })
}

/// The launcher: runs the orchestrator, starts `train.ranks` processes of `argv` (the command
/// line after the program name) with their rank's options added, each made into a process by
/// `spawn`, and waits for them. Fails, after stopping the others, as soon as one rank fails.
#[cfg(feature = "collective")]
pub(super) fn launch(
    train: &TrainArgs,
    argv: &[String],
    spawn: &dyn Fn(&[String]) -> Command,
) -> Result<RanksRun, Box<dyn Error>> {
    use burn_offload::collective::Orchestrator;
    check(train)?;
    let start = Instant::now();
    let timeout = Duration::from_secs_f64(train.collective_timeout);
    let orchestrator = Orchestrator::start(free_port()?, timeout)?;
    let address = format!("127.0.0.1:{}", orchestrator.port());
    println!(
        "data-parallel: {} ranks, one process each, burn-collective's orchestrator on {address}; \
         rank 0's output follows",
        train.ranks
    );
    let mut ranks: Vec<RankProcess> = Vec::with_capacity(train.ranks);
    for rank in 0..train.ranks {
        let mut args = argv.to_vec();
        args.extend([
            "--rank".to_string(),
            rank.to_string(),
            "--orchestrator".to_string(),
            address.clone(),
            "--data-port".to_string(),
            free_port()?.to_string(),
        ]);
        let spawned = spawn(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                // The ranks started so far would wait for this one until their timeout.
                stop(&mut ranks);
                return Err(format!("starting rank {rank}: {e}").into());
            }
        };
        let output = Arc::new(Mutex::new(String::new()));
        let first = rank == 0;
        let readers = vec![
            pump(
                child.stdout.take().expect("piped"),
                output.clone(),
                first.then_some(false),
            ),
            pump(
                child.stderr.take().expect("piped"),
                output.clone(),
                first.then_some(true),
            ),
        ];
        ranks.push(RankProcess {
            child,
            output,
            readers,
        });
    }

    // Wait for every rank; the first failure stops the others.
    let mut statuses = vec![None; ranks.len()];
    let mut failed = None;
    while failed.is_none() && statuses.iter().any(Option::is_none) {
        for (rank, process) in ranks.iter_mut().enumerate() {
            if statuses[rank].is_none()
                && let Some(status) = process.child.try_wait()?
            {
                statuses[rank] = Some(status);
                // A rank that trained to the end exits with success whatever its loss (the
                // launcher judges the loss): any other exit is a failure.
                if !status.success() {
                    failed = Some(rank);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if failed.is_some() {
        stop(&mut ranks);
    }
    let mut outputs = Vec::with_capacity(ranks.len());
    for process in ranks {
        for reader in process.readers {
            let _ = reader.join();
        }
        outputs.push(
            process
                .output
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
    }
    drop(orchestrator);
    if let Some(rank) = failed {
        let tail: Vec<&str> = outputs[rank].lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "rank {rank} failed ({}); the other ranks were stopped. Its last output:\n{}",
            statuses[rank].map_or("killed".to_string(), |s| s.to_string()),
            tail.join("\n")
        )
        .into());
    }
    let mut results = Vec::with_capacity(outputs.len());
    for (rank, output) in outputs.iter().enumerate() {
        let line = output
            .lines()
            .find_map(|l| l.strip_prefix(RESULT_PREFIX))
            .ok_or_else(|| format!("rank {rank} ended without its result line:\n{output}"))?;
        results.push(serde_json::from_str::<RankResult>(line)?);
    }
    let run = RanksRun {
        results,
        wall: start.elapsed(),
    };
    let digests: Vec<&str> = run.results.iter().map(|r| r.digest.as_str()).collect();
    println!("--- data-parallel summary ---");
    println!(
        "ranks             {} processes in {:.1?} (launch to the last rank's end)",
        run.results.len(),
        run.wall
    );
    if digests.iter().all(|d| *d == digests[0]) {
        println!(
            "parameters        bit-identical on every rank after training (digest {})",
            digests[0]
        );
    } else {
        return Err(format!(
            "the ranks' parameters differ after training (digests by rank: {})",
            digests.join(", ")
        )
        .into());
    }
    Ok(run)
}

/// Without the `collective` feature: says how to get it.
#[cfg(not(feature = "collective"))]
pub(super) fn launch(
    train: &TrainArgs,
    _argv: &[String],
    _spawn: &dyn Fn(&[String]) -> Command,
) -> Result<RanksRun, Box<dyn Error>> {
    check(train)?;
    Err(format!(
        "--ranks {}: this example was built without the `collective` feature; rebuild it with \
         `--features collective` (data-parallel training over burn-collective)",
        train.ranks
    )
    .into())
}

impl RanksRun {
    /// The losses of the run (rank 0's record of the mean over the ranks).
    pub fn losses(&self) -> &[f32] {
        self.results.first().map_or(&[], |r| r.losses.as_slice())
    }

    /// Success if the last step's loss is below the first's; otherwise says so and fails.
    pub fn exit_code(&self) -> ExitCode {
        let losses = self.losses();
        match (losses.first(), losses.last()) {
            (Some(first), Some(last)) if last < first => ExitCode::SUCCESS,
            _ => {
                eprintln!(
                    "FAILED: the loss did not go down over the ranks' steps: {losses:?} (train \
                     for more --steps, or change --lr)"
                );
                ExitCode::FAILURE
            }
        }
    }
}

/// FNV-1a over the bits of every float parameter, in module order.
struct Digest(u64);

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Digest {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        for byte in param.val().into_data().as_bytes() {
            self.0 = (self.0 ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
}

/// The digest of `module`'s parameters.
pub(super) fn digest<B: burn::tensor::backend::Backend, M: Module<B>>(module: &M) -> String {
    let mut digest = Digest(0xcbf2_9ce4_8422_2325);
    module.visit(&mut digest);
    format!("{:016x}", digest.0)
}

/// This process's part in a data-parallel run (`--rank`).
pub(super) struct RankPart<T: OffloadTarget> {
    /// The rank.
    pub rank: u32,
    /// The number of ranks.
    pub ranks: usize,
    #[cfg(feature = "collective")]
    collective: burn_offload::collective::CollectiveRank<T>,
    #[cfg(not(feature = "collective"))]
    never: (std::convert::Infallible, std::marker::PhantomData<T>),
}

impl<T: OffloadTarget> RankPart<T> {
    /// Registers this process as rank `--rank` (none without it): waits for every rank.
    #[cfg(feature = "collective")]
    pub fn join(
        train: &TrainArgs,
        device: &OffloadDevice<T::Device>,
    ) -> Result<Option<Self>, Box<dyn Error>> {
        use burn_offload::collective::{CollectiveRank, CollectiveSetup};
        let Some(rank) = train.rank else {
            return Ok(None);
        };
        // `train_on` has checked the options (`check`) before calling this.
        let (Some(orchestrator), Some(port)) = (&train.orchestrator, train.data_port) else {
            return Err(
                "--rank needs --orchestrator and --data-port (the launcher gives them: \
                        run with --ranks N alone)"
                    .into(),
            );
        };
        let setup = CollectiveSetup::new(
            rank,
            train.ranks as u32,
            orchestrator.as_str(),
            "127.0.0.1",
            port,
        )
        .timeout(Duration::from_secs_f64(train.collective_timeout));
        let collective = CollectiveRank::<T>::register(setup, device)?;
        Ok(Some(Self {
            rank,
            ranks: train.ranks,
            collective,
        }))
    }

    /// Without the `collective` feature there are no ranks.
    #[cfg(not(feature = "collective"))]
    pub fn join(
        train: &TrainArgs,
        _device: &OffloadDevice<T::Device>,
    ) -> Result<Option<Self>, Box<dyn Error>> {
        match train.rank {
            None => Ok(None),
            Some(_) => Err("--rank needs the `collective` feature".into()),
        }
    }

    /// The sequences of each step's batch this rank trains on.
    pub fn slice(&self, batch: usize) -> std::ops::Range<usize> {
        slice(batch, self.rank as usize, self.ranks)
    }

    /// Every rank gets rank 0's weights.
    pub fn broadcast<AB, M>(&self, model: M) -> Result<M, Box<dyn Error>>
    where
        AB: AutodiffBackend<
                InnerBackend = burn_offload::OffloadBackend<T>,
                Device = OffloadDevice<T::Device>,
            >,
        M: Module<AB>,
    {
        #[cfg(feature = "collective")]
        return Ok(self.collective.broadcast_module(model, 0)?);
        #[cfg(not(feature = "collective"))]
        {
            let _ = model;
            match self.never.0 {}
        }
    }

    /// The gradients' mean over the ranks.
    pub fn all_reduce<AB, M>(
        &self,
        grads: GradientsParams,
        model: &M,
    ) -> Result<GradientsParams, Box<dyn Error>>
    where
        AB: AutodiffBackend<
                InnerBackend = burn_offload::OffloadBackend<T>,
                Device = OffloadDevice<T::Device>,
            >,
        M: Module<AB>,
    {
        #[cfg(feature = "collective")]
        return Ok(self.collective.all_reduce_grads(grads, model)?);
        #[cfg(not(feature = "collective"))]
        {
            let _ = (grads, model);
            match self.never.0 {}
        }
    }

    /// The mean of this rank's loss over the ranks.
    pub fn mean_loss(
        &self,
        loss: Tensor<burn_offload::OffloadBackend<T>, 1>,
    ) -> Result<f32, Box<dyn Error>> {
        #[cfg(feature = "collective")]
        {
            let mean = self.collective.all_reduce_mean(loss)?;
            Ok(mean.into_data().iter::<f32>().next().unwrap_or(f32::NAN))
        }
        #[cfg(not(feature = "collective"))]
        {
            let _ = loss;
            match self.never.0 {}
        }
    }

    /// Unregisters; this rank's result (print its [`RankResult::line`] last).
    pub fn finish<B: burn::tensor::backend::Backend, M: Module<B>>(
        self,
        model: &M,
        losses: &[f32],
    ) -> Result<RankResult, Box<dyn Error>> {
        let result = RankResult {
            rank: self.rank,
            digest: digest(model),
            losses: losses.to_vec(),
        };
        #[cfg(feature = "collective")]
        {
            self.collective.finish()?;
            Ok(result)
        }
        #[cfg(not(feature = "collective"))]
        {
            let _ = result;
            match self.never.0 {}
        }
    }
}
