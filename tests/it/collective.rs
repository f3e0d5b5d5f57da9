//! Data-parallel training over burn-collective (feature `collective`): each rank, and the
//! orchestrator, is a child process of this test binary (the test's exact name, a role in
//! [`ROLE_ENV`]), on 127.0.0.1 with ports chosen free at run time. Every child is killed at
//! [`DEADLINE`], so a hang fails the test instead of blocking CI.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn::tensor::backend::AutodiffBackend;
use burn_offload::collective::{CollectiveRank, CollectiveSetup, Orchestrator};
use burn_offload::{
    OffloadBackend, OffloadError, OffloadMode, OffloadOptimizer, OffloadPolicy, OffloadReport,
};
use serde_json::{Value, json};

use crate::common::process::{CHILD_ENV, own_process, test_name};
use crate::common::{CPU, D_MODEL, D_OUT, SmallMlp, device, placements, values};

type Ref = Autodiff<NdArray>;
type Off = Autodiff<OffloadBackend<NdArray>>;
type Inner = OffloadBackend<NdArray>;

/// The child's role: `orchestrator` or `rank`.
const ROLE_ENV: &str = "BURN_OFFLOAD_COLLECTIVE_ROLE";
/// The child's rank, the world size, the orchestrator's port, the rank's data port, the file
/// the rank writes its results to.
const RANK_ENV: &str = "BURN_OFFLOAD_COLLECTIVE_RANK";
const WORLD_ENV: &str = "BURN_OFFLOAD_COLLECTIVE_WORLD";
const ORCHESTRATOR_ENV: &str = "BURN_OFFLOAD_COLLECTIVE_ORCHESTRATOR_PORT";
const DATA_PORT_ENV: &str = "BURN_OFFLOAD_COLLECTIVE_DATA_PORT";
const OUT_ENV: &str = "BURN_OFFLOAD_COLLECTIVE_OUT";

/// Every child is killed this long after the world starts.
const DEADLINE: Duration = Duration::from_secs(120);
/// Each collective call's timeout in the tests where every rank lives.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Each collective call's timeout where a peer dies or disagrees: what the survivors wait.
const FAULT_TIMEOUT: Duration = Duration::from_secs(15);

const STEPS: usize = 5;
/// The whole batch; each of the two ranks trains on its half.
const BATCH: usize = 8;
const LR: f64 = 1e-2;
/// Ranks against the single-process reference.
const REL: f32 = 1e-5;
/// 16 values: the MLP's 212 parameter values (and 4 gradient flags) go in 14 exchanges, most
/// of them across parameter boundaries, and `fc1.weight` (128 values) in 8.
const SMALL_CHUNK: usize = 64;

/// The name of the calling test, as the harness filters by it.
macro_rules! this_test {
    () => {{
        fn here() {}
        let path = ::std::any::type_name_of_val(&here);
        test_name(path.strip_suffix("::here").unwrap_or(path)).to_string()
    }};
}

/// What this process is in the test `name`: `None` in the test harness's own process.
fn role(name: &str) -> Option<String> {
    if std::env::var(CHILD_ENV).as_deref() != Ok(name) {
        return None;
    }
    std::env::var(ROLE_ENV).ok()
}

fn env_u32(key: &str) -> u32 {
    std::env::var(key)
        .unwrap_or_else(|_| panic!("{key} is set for a rank"))
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}"))
}

/// A rank child's setup, from its environment.
fn setup_from_env(timeout: Duration) -> CollectiveSetup {
    CollectiveSetup::new(
        env_u32(RANK_ENV),
        env_u32(WORLD_ENV),
        format!("127.0.0.1:{}", env_u32(ORCHESTRATOR_ENV)),
        "127.0.0.1",
        env_u32(DATA_PORT_ENV) as u16,
    )
    .timeout(timeout)
}

/// Writes a rank's results for the parent.
fn write_out(out: &Value) {
    let path = std::env::var(OUT_ENV).expect("the parent names the output file");
    std::fs::write(&path, serde_json::to_vec_pretty(out).unwrap()).unwrap();
}

/// The orchestrator child: runs until the parent kills it.
fn run_orchestrator() {
    let port = env_u32(ORCHESTRATOR_ENV) as u16;
    let orchestrator = Orchestrator::start(port, Duration::from_secs(10)).unwrap();
    eprintln!("orchestrator listening on {}", orchestrator.port());
    orchestrator.wait();
}

/// A port nothing listens on now (on every interface, as burn-collective's servers bind).
fn free_port() -> u16 {
    std::net::TcpListener::bind(("0.0.0.0", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a child ended.
#[derive(Debug)]
struct Ended {
    /// `None`: killed at the deadline.
    status: Option<ExitStatus>,
    wall: Duration,
    out: Option<Value>,
    log: String,
}

/// The children of one test: an orchestrator and `world` ranks.
struct World {
    dir: tempfile::TempDir,
    name: String,
    start: Instant,
    orchestrator: Child,
    ranks: Vec<Child>,
}

impl World {
    /// Starts the orchestrator, waits until it listens, then starts the ranks.
    fn start(name: &str, world: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let orchestrator_port = free_port();
        let spawn = |role: &str, tag: &str, envs: Vec<(&str, String)>| -> Child {
            let log = |ext: &str| File::create(dir.path().join(format!("{tag}.{ext}"))).unwrap();
            Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD_ENV, name)
                .env(ROLE_ENV, role)
                .env(ORCHESTRATOR_ENV, orchestrator_port.to_string())
                .envs(envs)
                .stdin(Stdio::null())
                .stdout(log("stdout"))
                .stderr(log("stderr"))
                .spawn()
                .unwrap_or_else(|e| panic!("{name}: starting {tag}: {e}"))
        };
        let start = Instant::now();
        let mut orchestrator = spawn("orchestrator", "orchestrator", vec![]);
        while std::net::TcpStream::connect(("127.0.0.1", orchestrator_port)).is_err() {
            if let Some(status) = orchestrator.try_wait().unwrap() {
                panic!(
                    "{name}: the orchestrator ended ({status}): {}",
                    read_log(dir.path(), "orchestrator")
                );
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{name}: the orchestrator never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let ranks = (0..world)
            .map(|rank| {
                spawn(
                    "rank",
                    &format!("rank{rank}"),
                    vec![
                        (RANK_ENV, rank.to_string()),
                        (WORLD_ENV, world.to_string()),
                        (DATA_PORT_ENV, free_port().to_string()),
                        (
                            OUT_ENV,
                            dir.path()
                                .join(format!("rank{rank}.json"))
                                .display()
                                .to_string(),
                        ),
                    ],
                )
            })
            .collect();
        Self {
            dir,
            name: name.to_string(),
            start,
            orchestrator,
            ranks,
        }
    }

    /// Waits for every rank (killing those still running at the deadline), then stops the
    /// orchestrator.
    fn wait(mut self) -> Vec<Ended> {
        let mut ended: Vec<Option<Ended>> = self.ranks.iter().map(|_| None).collect();
        while ended.iter().any(Option::is_none) {
            let late = self.start.elapsed() >= DEADLINE;
            for (rank, child) in self.ranks.iter_mut().enumerate() {
                if ended[rank].is_some() {
                    continue;
                }
                let status = if late {
                    let _ = child.kill();
                    let _ = child.wait();
                    Some(None)
                } else {
                    child.try_wait().unwrap().map(Some)
                };
                if let Some(status) = status {
                    let tag = format!("rank{rank}");
                    let out = std::fs::read(self.dir.path().join(format!("{tag}.json")))
                        .ok()
                        .map(|bytes| serde_json::from_slice(&bytes).unwrap());
                    ended[rank] = Some(Ended {
                        status,
                        wall: self.start.elapsed(),
                        out,
                        log: read_log(self.dir.path(), &tag),
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.orchestrator.kill();
        let _ = self.orchestrator.wait();
        let ended: Vec<Ended> = ended.into_iter().map(Option::unwrap).collect();
        for (rank, e) in ended.iter().enumerate() {
            println!(
                "{}: rank {rank} ended after {:.1} s: {}",
                self.name,
                e.wall.as_secs_f64(),
                e.status
                    .map_or("killed at the deadline".into(), |s| s.to_string())
            );
        }
        ended
    }
}

/// A child's stdout and stderr, for failure messages.
fn read_log(dir: &Path, tag: &str) -> String {
    let read =
        |ext: &str| std::fs::read_to_string(dir.join(format!("{tag}.{ext}"))).unwrap_or_default();
    format!(
        "\n--- {tag} stdout\n{}\n--- {tag} stderr\n{}",
        read("stdout"),
        read("stderr")
    )
}

/// The rank ran its test to the end (it passed) and wrote its results.
fn passed<'a>(name: &str, rank: usize, ended: &'a Ended) -> &'a Value {
    assert!(
        ended.status.is_some_and(|s| s.success()),
        "{name}: rank {rank} ended {:?}{}",
        ended.status,
        ended.log
    );
    ended
        .out
        .as_ref()
        .unwrap_or_else(|| panic!("{name}: rank {rank} wrote no results{}", ended.log))
}

fn error_json(error: &OffloadError, wall: Duration) -> Value {
    let variant = match error {
        OffloadError::CollectiveTimeout { .. } => "CollectiveTimeout",
        OffloadError::Collective { .. } => "Collective",
        OffloadError::CollectiveMismatch { .. } => "CollectiveMismatch",
        OffloadError::CollectiveSetup { .. } => "CollectiveSetup",
        _ => "other",
    };
    json!({
        "variant": variant,
        "message": error.to_string(),
        "seconds": wall.as_secs_f64(),
    })
}

// ---------------------------------------------------------------------------------------------
// (c) Ranks that disagree on a shape.

/// Rank `r` all-reduces `[2, 3]` filled with `r + 1` (the mean is checked), then rank 0 a
/// `[4, 3]` and rank 1 a `[3, 4]` tensor: the same number of values, another shape.
fn mismatch_rank() {
    let setup = setup_from_env(FAULT_TIMEOUT);
    let r = setup.rank();
    let rank = CollectiveRank::<NdArray>::register(setup, &device()).unwrap();
    let agreed = rank
        .all_reduce_mean(Tensor::<Inner, 2>::full([2, 3], r as f32 + 1.0, &device()))
        .unwrap();
    let agreed = agreed.into_data().to_vec::<f32>().unwrap();
    let shape = if r == 0 { [4, 3] } else { [3, 4] };
    let start = Instant::now();
    let error = rank
        .all_reduce_mean(Tensor::<Inner, 2>::ones(shape, &device()))
        .unwrap_err();
    let wall = start.elapsed();
    // The rank is unusable after it: the next call returns the same error at once.
    let again = rank
        .all_reduce_mean(Tensor::<Inner, 2>::ones([2, 3], &device()))
        .unwrap_err();
    assert_eq!(again, error);
    write_out(&json!({ "agreed": agreed, "error": error_json(&error, wall) }));
}

#[test]
fn a_shape_mismatch_fails_every_rank_with_what_each_sent() {
    let name = this_test!();
    match role(&name).as_deref() {
        Some("orchestrator") => return run_orchestrator(),
        Some(_) => return mismatch_rank(),
        None => {}
    }
    let ended = World::start(&name, 2).wait();
    for (rank, e) in ended.iter().enumerate() {
        let out = passed(&name, rank, e);
        // (1 + 2) / 2 everywhere.
        assert_eq!(out["agreed"], json!(vec![1.5; 6]), "rank {rank}");
        let error = &out["error"];
        assert_eq!(
            error["variant"], "CollectiveMismatch",
            "rank {rank}: {error}"
        );
        let message = error["message"].as_str().unwrap();
        // Both ranks' views, and what to change.
        for says in [
            "rank 0: all-reduce of a tensor: 12 values of shape [4, 3]",
            "rank 1: all-reduce of a tensor: 12 values of shape [3, 4]",
            "same collective calls in the same order",
        ] {
            assert!(message.contains(says), "rank {rank}: {message}");
        }
        println!("{name}: rank {rank}: {message}");
        assert!(
            error["seconds"].as_f64().unwrap() < FAULT_TIMEOUT.as_secs_f64(),
            "rank {rank}: a disagreement is found in the header exchange, not by a timeout: \
             {error}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Three ranks, many rounds.

const ROUNDS: usize = 20;

/// Rank `r` all-reduces `[5]` filled with `(r + 1) * (round + 1)`, [`ROUNDS`] times.
fn rounds_rank() {
    let setup = setup_from_env(CALL_TIMEOUT);
    let r = setup.rank() as f32;
    let rank = CollectiveRank::<NdArray>::register(setup, &device()).unwrap();
    let means: Vec<Vec<f32>> = (0..ROUNDS)
        .map(|round| {
            let value = (r + 1.0) * (round as f32 + 1.0);
            let mean = rank
                .all_reduce_mean(Tensor::<Inner, 1>::full([5], value, &device()))
                .unwrap();
            mean.into_data().to_vec::<f32>().unwrap()
        })
        .collect();
    rank.finish().unwrap();
    write_out(&json!({ "means": means }));
}

/// burn-collective's multi-node all-reduce, called again and again by three ranks (its ring cuts
/// 5 values in slices of 2, 2 and 1), gives every rank the mean each time.
#[test]
fn three_ranks_all_reduce_round_after_round() {
    let name = this_test!();
    match role(&name).as_deref() {
        Some("orchestrator") => return run_orchestrator(),
        Some(_) => return rounds_rank(),
        None => {}
    }
    let ended = World::start(&name, 3).wait();
    for (rank, e) in ended.iter().enumerate() {
        let out = passed(&name, rank, e);
        // The mean of (1, 2, 3) * (round + 1).
        let expected: Vec<Vec<f32>> = (0..ROUNDS)
            .map(|round| vec![2.0 * (round as f32 + 1.0); 5])
            .collect();
        assert_eq!(out["means"], json!(expected), "rank {rank}");
    }
}

// ---------------------------------------------------------------------------------------------
// (a) Two ranks train like one process.

/// The whole batch: inputs `[BATCH, D_MODEL]`, targets `[BATCH, D_OUT]`.
fn batch() -> (TensorData, TensorData) {
    (
        crate::common::data(&[BATCH, D_MODEL], 11),
        crate::common::data(&[BATCH, D_OUT], 12),
    )
}

/// Rows `[from, from + n)` of `data` (`[rows, cols]`).
fn rows(data: &TensorData, from: usize, n: usize) -> TensorData {
    let cols = data.shape[1];
    let values = data.to_vec::<f32>().unwrap();
    TensorData::new(values[from * cols..(from + n) * cols].to_vec(), [n, cols])
}

/// Each parameter's path and values as f32 bits (compared exactly).
fn bits_of<B: Backend, M: Module<B>>(module: &M) -> Value {
    Value::Array(
        values(module)
            .into_iter()
            .map(|(path, data)| json!([path, bits(&data)]))
            .collect(),
    )
}

fn bits(data: &TensorData) -> Vec<u32> {
    data.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// `[[path, values], ...]` back, as f32.
fn floats_of(value: &Value) -> Vec<(String, Vec<f32>)> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| {
            let path = entry[0].as_str().unwrap().to_string();
            let values = entry[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| f32::from_bits(b.as_u64().unwrap() as u32))
                .collect();
            (path, values)
        })
        .collect()
}

/// Each gradient in `grads` of a parameter of `module`, by path, as f32 bits.
fn grad_bits<AB: AutodiffBackend, M: Module<AB>>(grads: &GradientsParams, module: &M) -> Value {
    struct Grads<'a> {
        grads: &'a GradientsParams,
        path: Vec<String>,
        out: Vec<Value>,
    }
    impl<AB: AutodiffBackend> ModuleVisitor<AB> for Grads<'_> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AB, D>>) {
            let grad = self
                .grads
                .get::<AB::InnerBackend, D>(param.id)
                .unwrap_or_else(|| panic!("{}: no gradient", self.path.join(".")));
            self.out
                .push(json!([self.path.join("."), bits(&grad.into_data())]));
        }
    }
    let mut visitor = Grads {
        grads,
        path: Vec::new(),
        out: Vec::new(),
    };
    module.visit(&mut visitor);
    Value::Array(visitor.out)
}

/// Each parameter's path, whether it is in host memory, and whether it is in the model's
/// context (the report's) there.
fn placed(model: &SmallMlp<Off>, report: &OffloadReport) -> Value {
    let context = report.context().expect("a policy's report has a context");
    let contexts = [
        host_in(model.fc1.weight.val().inner().into_primitive(), context),
        host_in(
            model
                .fc1
                .bias
                .as_ref()
                .unwrap()
                .val()
                .inner()
                .into_primitive(),
            context,
        ),
        host_in(model.fc2.weight.val().inner().into_primitive(), context),
        host_in(
            model
                .fc2
                .bias
                .as_ref()
                .unwrap()
                .val()
                .inner()
                .into_primitive(),
            context,
        ),
    ];
    Value::Array(
        placements(model)
            .into_iter()
            .zip(contexts)
            .map(|((path, host), in_context)| json!([path, host, in_context]))
            .collect(),
    )
}

/// Whether `primitive` is in host memory of `context`.
fn host_in(primitive: TensorPrimitive<Inner>, context: &burn_offload::OffloadContext) -> bool {
    match primitive {
        TensorPrimitive::Float(tensor) => tensor
            .offloaded()
            .is_some_and(|o| o.context().same(context)),
        TensorPrimitive::QFloat(_) => false,
    }
}

/// Rank 0 offloads everything (`copy`), rank 1 `fc2` only (`prefetch`). Rank 1 starts from
/// other random weights (another seed) and gets rank 0's by broadcast; each trains on its half
/// of the batch, gradients all-reduced (mean), in chunks of `chunk_bytes`. With `die_at`, rank 1 exits in the middle of that
/// step (after its backward pass, before its all-reduce), and rank 0 records the error it gets.
fn train_rank(timeout: Duration, chunk_bytes: usize, die_at: Option<usize>) {
    let setup = setup_from_env(timeout).chunk_bytes(chunk_bytes);
    let r = setup.rank();
    assert_eq!(setup.world_size(), 2);
    let rank = CollectiveRank::<NdArray>::register(setup, &device()).unwrap();
    <Off as Backend>::seed(&device(), 40 + u64::from(r));
    let policy = match r {
        0 => OffloadPolicy::from_bytes(u64::MAX).mode(OffloadMode::Copy),
        _ => OffloadPolicy::from_bytes(u64::MAX)
            .params(["fc2"])
            .mode(OffloadMode::prefetch(1 << 20)),
    };
    let (model, report) = policy.apply(SmallMlp::<Off>::new(&device())).unwrap();
    let mut out = json!({ "rank": r });
    // Rank 0 reads (initialises) its weights before the broadcast; rank 1's are still lazy.
    if r == 0 {
        out["initial"] = bits_of(&model);
    }
    let model = rank.broadcast_module(model, 0).unwrap();
    out["after_broadcast"] = bits_of(&model);
    out["placed_after_broadcast"] = placed(&model, &report);
    if r == 1 {
        // The weights rank 1 would have had without the broadcast.
        <Off as Backend>::seed(&device(), 41);
        out["own"] = bits_of(&SmallMlp::<Off>::new(&device()));
    }

    let (x, y) = batch();
    let half = BATCH / 2;
    let x = Tensor::<Off, 2>::from_data(rows(&x, r as usize * half, half), &device());
    let y = Tensor::<Off, 2>::from_data(rows(&y, r as usize * half, half), &device());
    let mut optim = OffloadOptimizer::new(AdamConfig::new().init::<Off, SmallMlp<Off>>(), &report);
    let mut model = model;
    let mut losses = Vec::new();
    for step in 0..STEPS {
        let loss = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
        losses.push(loss.clone().into_scalar().elem::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        if die_at == Some(step) && r == 1 {
            std::process::exit(3);
        }
        let start = Instant::now();
        let grads = match rank.all_reduce_grads(grads, &model) {
            Ok(grads) => grads,
            Err(error) if die_at.is_some() => {
                let wall = start.elapsed();
                // Unusable from now on: the next call returns the same error at once.
                let again = rank.all_reduce_mean(Tensor::<Inner, 1>::ones([2], &device()));
                assert_eq!(again.unwrap_err(), error);
                out["failed_at"] = json!(step);
                out["error"] = error_json(&error, wall);
                write_out(&out);
                return;
            }
            Err(error) => panic!("step {step}: {error}"),
        };
        if step == 0 {
            out["grads0"] = grad_bits(&grads, &model);
        }
        model = optim.step(LR, model, grads);
    }
    assert!(die_at.is_none(), "rank {r} finished every step");
    out["losses"] = json!(losses);
    out["final"] = bits_of(&model);
    out["placed_final"] = placed(&model, &report);
    out["offloaded"] = json!(crate::common::offloaded_paths(&report));
    // Rank 1 takes one more step on its own, then broadcasts: rank 0's parameters are
    // initialised and in host memory now (the broadcast's other path), rank 1 keeps its own.
    if r == 1 {
        let loss = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(LR, model, grads);
        out["own_step"] = bits_of(&model);
    }
    let model = rank.broadcast_module(model, 1).unwrap();
    out["from_rank_1"] = bits_of(&model);
    out["placed_from_rank_1"] = placed(&model, &report);
    rank.finish().unwrap();
    write_out(&out);
}

/// The single-process reference: plain `Autodiff<NdArray>` from rank 0's initial weights, on
/// the whole batch. Returns the losses, the first step's gradients and the final weights.
fn reference(initial: &[(String, Vec<f32>)]) -> (Vec<f32>, Value, Value) {
    struct Load<'a>(std::slice::Iter<'a, (String, Vec<f32>)>);
    impl ModuleMapper<Ref> for Load<'_> {
        fn map_float<const D: usize>(
            &mut self,
            param: Param<Tensor<Ref, D>>,
        ) -> Param<Tensor<Ref, D>> {
            let (id, old, mapper) = param.consume();
            let (_, values) = self.0.next().expect("as many values as parameters");
            let data = TensorData::new(values.clone(), old.shape());
            Param::from_mapped_value(id, Tensor::from_data(data, &CPU).require_grad(), mapper)
        }
    }
    let mut model = SmallMlp::<Ref>::new(&CPU).map(&mut Load(initial.iter()));
    let (x, y) = batch();
    let x = Tensor::<Ref, 2>::from_data(x, &CPU);
    let y = Tensor::<Ref, 2>::from_data(y, &CPU);
    let mut optim = AdamConfig::new().init::<Ref, SmallMlp<Ref>>();
    let mut losses = Vec::new();
    let mut grads0 = Value::Null;
    for step in 0..STEPS {
        let loss = (model.forward(x.clone()) - y.clone()).powi_scalar(2).mean();
        losses.push(loss.clone().into_scalar().elem::<f32>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        if step == 0 {
            grads0 = grad_bits(&grads, &model);
        }
        model = optim.step(LR, model, grads);
    }
    (losses, grads0, bits_of(&model))
}

/// The same paths and bit-identical values; a failure names the first difference.
fn same(actual: &Value, expected: &Value, what: &str) {
    let actual = floats_of(actual);
    let expected = floats_of(expected);
    assert_eq!(actual.len(), expected.len(), "{what}");
    for ((path, a), (epath, e)) in actual.iter().zip(&expected) {
        assert_eq!(path, epath, "{what}");
        assert_eq!(a.len(), e.len(), "{what} {path}");
        if let Some(i) = (0..a.len()).find(|&i| a[i].to_bits() != e[i].to_bits()) {
            panic!("{what} {path}[{i}]: {} vs {}", a[i], e[i]);
        }
    }
}

/// `|a - b| <= rel * max|expected|` per tensor, paths equal.
fn assert_close(actual: &Value, expected: &Value, what: &str) {
    let actual = floats_of(actual);
    let expected = floats_of(expected);
    assert_eq!(actual.len(), expected.len(), "{what}");
    for ((path, a), (epath, e)) in actual.iter().zip(&expected) {
        assert_eq!(path, epath, "{what}");
        assert_eq!(a.len(), e.len(), "{what} {path}");
        let scale = e.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        for (i, (a, e)) in a.iter().zip(e).enumerate() {
            assert!(
                (a - e).abs() <= REL * scale,
                "{what} {path}[{i}]: {a} vs {e} (scale {scale}, rel {REL})"
            );
        }
    }
}

#[test]
fn two_ranks_with_different_policies_train_like_one_process() {
    let name = this_test!();
    match role(&name).as_deref() {
        Some("orchestrator") => return run_orchestrator(),
        Some(_) => return train_rank(CALL_TIMEOUT, SMALL_CHUNK, None),
        None => {}
    }
    let ended = World::start(&name, 2).wait();
    let r0 = passed(&name, 0, &ended[0]);
    let r1 = passed(&name, 1, &ended[1]);

    // The broadcast: rank 1 started elsewhere and has rank 0's weights, exactly.
    assert_ne!(
        r1["own"], r0["initial"],
        "rank 1's own weights are other weights"
    );
    assert_eq!(r0["after_broadcast"], r0["initial"]);
    assert_eq!(r1["after_broadcast"], r0["initial"]);

    // Each rank's policy holds after the broadcast and after the steps: in host memory of the
    // model's context exactly what the policy offloaded.
    let expected_placement = |offload: &[&str]| -> Value {
        Value::Array(
            ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
                .iter()
                .map(|p| {
                    let host = offload.iter().any(|o| p.starts_with(o));
                    json!([p, host, host])
                })
                .collect(),
        )
    };
    let all = expected_placement(&["fc1", "fc2"]);
    let part = expected_placement(&["fc2"]);
    assert_eq!(r0["placed_after_broadcast"], all);
    assert_eq!(r0["placed_final"], all);
    assert_eq!(r1["placed_after_broadcast"], part);
    assert_eq!(r1["placed_final"], part);
    // A broadcast from rank 1 after its own step: rank 0 gets those weights, in place.
    assert!(
        r1["own_step"] != r1["final"],
        "rank 1's own step changed its weights"
    );
    same(
        &r1["from_rank_1"],
        &r1["own_step"],
        "rank 1 (the root) after its broadcast",
    );
    same(
        &r0["from_rank_1"],
        &r1["own_step"],
        "rank 0 after rank 1's broadcast",
    );
    assert_eq!(r0["placed_from_rank_1"], all);
    assert_eq!(r1["placed_from_rank_1"], part);
    assert_eq!(
        r1["offloaded"],
        json!(["fc2.weight", "fc2.bias"]),
        "rank 1's policy"
    );

    // Same gradients and the same weights on both ranks, bit for bit.
    same(
        &r1["grads0"],
        &r0["grads0"],
        "rank 1's all-reduced gradients",
    );
    same(&r1["final"], &r0["final"], "rank 1's final weights");
    assert!(
        r0["final"] != r0["initial"],
        "the steps changed the weights"
    );

    // And what one process computes on the whole batch.
    let (losses, grads0, last) = reference(&floats_of(&r0["initial"]));
    assert!(
        losses[STEPS - 1] < losses[0],
        "the reference learns: {losses:?}"
    );
    let halves = |r: &Value| -> Vec<f32> {
        r["losses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    assert_close(&r0["grads0"], &grads0, "first step's all-reduced gradients");
    for (step, ((a, b), full)) in halves(r0).iter().zip(halves(r1)).zip(&losses).enumerate() {
        // The mean over the whole batch is the mean of the two equal halves' means.
        let mean = (a + b) / 2.0;
        assert!(
            (mean - full).abs() <= REL * full.abs(),
            "step {step}: ranks' mean loss {mean} vs one process {full}"
        );
    }
    assert_close(&r0["final"], &last, "final weights");
}

// ---------------------------------------------------------------------------------------------
// (b) A peer dies.

/// The step in which rank 1 exits.
const DIE_AT: usize = 2;

#[test]
fn a_peer_that_dies_mid_step_fails_the_other_rank_in_time() {
    let name = this_test!();
    match role(&name).as_deref() {
        Some("orchestrator") => return run_orchestrator(),
        Some(_) => {
            return train_rank(
                FAULT_TIMEOUT,
                CollectiveSetup::DEFAULT_CHUNK_BYTES,
                Some(DIE_AT),
            );
        }
        None => {}
    }
    let ended = World::start(&name, 2).wait();
    assert_eq!(
        ended[1].status.and_then(|s| s.code()),
        Some(3),
        "rank 1 exits in step {DIE_AT}{}",
        ended[1].log
    );
    let r0 = passed(&name, 0, &ended[0]);
    assert_eq!(
        r0["failed_at"],
        json!(DIE_AT),
        "the steps before went through"
    );
    let error = &r0["error"];
    let variant = error["variant"].as_str().unwrap();
    assert!(
        ["Collective", "CollectiveTimeout"].contains(&variant),
        "a typed collective error: {error}"
    );
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("gradient all-reduce") && message.contains("rank 0"),
        "{message}"
    );
    assert!(
        message.contains("peer") && message.contains("other ranks' output"),
        "says what to check: {message}"
    );
    let seconds = error["seconds"].as_f64().unwrap();
    assert!(
        seconds <= FAULT_TIMEOUT.as_secs_f64() + 5.0,
        "bounded by the timeout: {seconds} s"
    );
    println!("{name}: rank 0 got {variant} after {seconds:.2} s: {message}");
}

// ---------------------------------------------------------------------------------------------
// (d) No orchestrator.

/// A rank whose orchestrator never comes fails its registration at the timeout; a second
/// registration in the process is refused.
#[test]
fn registration_without_an_orchestrator_times_out() {
    own_process!("registers burn-collective's process-wide rank");
    let nobody = free_port();
    let timeout = Duration::from_secs(2);
    let setup = CollectiveSetup::new(
        0,
        2,
        format!("127.0.0.1:{nobody}"),
        "127.0.0.1",
        free_port(),
    )
    .timeout(timeout);
    let start = Instant::now();
    let error = CollectiveRank::<NdArray>::register(setup.clone(), &device()).unwrap_err();
    let wall = start.elapsed();
    assert!(
        matches!(&error, OffloadError::CollectiveTimeout { op, rank: 0, .. } if op == "registration"),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("orchestrator is unreachable"),
        "{error}"
    );
    assert!(
        wall >= timeout && wall < timeout + Duration::from_secs(3),
        "{wall:?}"
    );
    let again = CollectiveRank::<NdArray>::register(setup, &device()).unwrap_err();
    assert!(
        matches!(&again, OffloadError::CollectiveSetup { reason } if reason.contains("one registration per process")),
        "{again:?}"
    );
}
