//! Compiles every hand-written CUDA kernel (`src/inner/cuda/kernels/*.cu`, found at run time) with
//! NVRTC, the way cubecl-cuda 0.10 does it, for the architectures we target (`sm_80`, and
//! `sm_90a` on Hopper). No GPU is needed: only `libnvrtc` (and its `libnvrtc-builtins`).
//!
//! For a real `sm_XX` target NVRTC also runs ptxas, so errors in inline PTX are caught here,
//! not at module load on a device. Warnings fail the test too.
//!
//! Without NVRTC the test is skipped with a printed reason, unless `CI=true` or
//! `BURN_OFFLOAD_REQUIRE_NVRTC=1`, where it fails. To get NVRTC without a CUDA toolkit:
//! `eval "$(bash scripts/nvrtc-env.sh)"` (installs NVIDIA's PyPI wheels into `.ci-cache/`).

use std::collections::BTreeSet;
use std::ffi::{CString, c_char, c_int};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cudarc::nvrtc::{result, sys};

/// What cubecl-cuda 0.10 passes (`compute/context.rs`), minus its `--include-path`s: our
/// kernels must compile with no include path at all. `--ptxas-options=-v` only adds the
/// register / spill / shared memory report to the log (printed below).
fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-lineinfo".to_string(),
        "--ptxas-options=-v".to_string(),
    ]
}

/// Architectures we ship for: Ampere (A100) and Hopper (H100/H200; `a` = arch-specific, as
/// cubecl selects for `sm_90` and newer).
const ARCHS: [&str; 2] = ["sm_80", "sm_90a"];

/// Entry points the CUDA target launches, which must never disappear. Every other entry point
/// is found in the sources (see [`declared_entry_points`] and [`selectable_entry_points`]).
const REQUIRED_ENTRY_POINTS: &[(&str, &[&str])] = &[
    (
        "flags.cu",
        &["burn_offload_wait_flag", "burn_offload_set_flag"],
    ),
    (
        "matmul_host.cu",
        &[
            "matmul_host_rm_f32",
            "matmul_host_rm_f16",
            "matmul_host_rm_bf16",
            "matmul_host_rm_f32_m16",
            "matmul_host_rm_f16_m16",
            "matmul_host_rm_bf16_m16",
            "matmul_host_reduce_f32",
            "matmul_host_reduce_f16",
            "matmul_host_reduce_bf16",
            "matmul_host_tr_f32",
            "matmul_host_tr_f16",
            "matmul_host_tr_bf16",
        ],
    ),
    ("gather_host.cu", &["gather_host_i32", "gather_host_i64"]),
    (
        "qmatmul_host.cu",
        &[
            "qscales_f32_from_f32",
            "qscales_f32_from_f16",
            "qscales_f32_from_bf16",
            "qmatmul_host_q8_f32",
            "qmatmul_host_q8_f16",
            "qmatmul_host_q8_bf16",
            "qmatmul_host_q4_f32",
            "qmatmul_host_q4_f16",
            "qmatmul_host_q4_bf16",
            "qmatmul_host_q2_f32",
            "qmatmul_host_q2_f16",
            "qmatmul_host_q2_bf16",
            "qmatmul_host_q8_f32_m16",
            "qmatmul_host_q8_f16_m16",
            "qmatmul_host_q8_bf16_m16",
            "qmatmul_host_q4_f32_m16",
            "qmatmul_host_q4_f16_m16",
            "qmatmul_host_q4_bf16_m16",
            "qmatmul_host_reduce_f32",
            "qmatmul_host_reduce_f16",
            "qmatmul_host_reduce_bf16",
        ],
    ),
    (
        "qgather_host.cu",
        &[
            "qgather_host_f32_i32",
            "qgather_host_f32_i64",
            "qgather_host_f16_i32",
            "qgather_host_f16_i64",
            "qgather_host_bf16_i32",
            "qgather_host_bf16_i64",
        ],
    ),
];

/// Parameters of each launched entry point as its launcher in `src/inner/cuda/ops.rs` passes them:
/// the device buffers, then the by-value params struct. A kernel whose signature drifts from
/// its launcher would read garbage pointers on a GPU; here it fails to compile-check.
const ENTRY_PARAMS: &[(&str, usize)] = &[
    // (out, x, bias, partial, p)
    ("matmul_host_rm_f32", 5),
    ("matmul_host_rm_f32_m16", 5),
    // (out, partial, bias, p)
    ("matmul_host_reduce_f32", 4),
    // (out, x, bias, p)
    ("matmul_host_tr_f32", 4),
    // (out, ids, p): no status buffer, out-of-range ids are a device-side assertion.
    ("gather_host_i32", 3),
    ("gather_host_i64", 3),
    // `src/inner/cuda/quant_ops.rs`: (out, p)
    ("qscales_f32_from_f16", 2),
    // (out, x, bias, partial, scales, p)
    ("qmatmul_host_q4_f32", 6),
    ("qmatmul_host_q8_bf16_m16", 6),
    ("qmatmul_host_q2_f16", 6),
    // (out, partial, bias, p)
    ("qmatmul_host_reduce_f32", 4),
    // (out, ids, p): out-of-range ids are a device-side assertion, as in gather_host.
    ("qgather_host_f32_i32", 3),
    ("qgather_host_bf16_i64", 3),
];

/// Device functions each file's PTX must call: the contracts that make a launch fail rather
/// than read out of bounds (`gather_host.cu`: out-of-range ids fail a device-side assertion).
const REQUIRED_CALLS: &[(&str, &[&str])] = &[
    ("gather_host.cu", &["__assertfail"]),
    ("qgather_host.cu", &["__assertfail"]),
];

/// Per-entry selection (`#if !defined(BURN_OFFLOAD_SELECT_ENTRY) ||
/// defined(BURN_OFFLOAD_ONLY_<name>)`): a launcher prepends both defines to compile one entry.
const SELECT_DEFINE: &str = "BURN_OFFLOAD_SELECT_ENTRY";
const ONLY_PREFIX: &str = "BURN_OFFLOAD_ONLY_";

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/inner/cuda/kernels")
}

fn strict() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
        || std::env::var("BURN_OFFLOAD_REQUIRE_NVRTC").is_ok_and(|v| v == "1")
}

/// Skips (the caller returns) or fails, depending on [`strict`].
fn unavailable(reason: &str) {
    if strict() {
        panic!(
            "NVRTC is required here (CI=true or BURN_OFFLOAD_REQUIRE_NVRTC=1) but {reason}; \
             run `eval \"$(bash scripts/nvrtc-env.sh)\"` first"
        );
    }
    println!("SKIPPED: {reason}; run `eval \"$(bash scripts/nvrtc-env.sh)\"` to enable this test");
}

/// Removes `//` and `/* */` comments (kernel sources have no comment markers in strings).
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            rest = r.find('\n').map_or("", |i| &r[i..]);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.find("*/").map_or("", |i| &r[i + 2..]);
            out.push(' ');
        } else {
            let c = rest.chars().next().expect("not empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Names of the kernels written out as `__global__ [void] [__launch_bounds__(..)] name(`.
/// Inside macros (`prefix_##SUFFIX(`, or an all-caps macro parameter such as `NAME(`) there is
/// no name to see: those are skipped.
fn declared_entry_points(src: &str) -> BTreeSet<String> {
    let src = strip_comments(src);
    let mut names = BTreeSet::new();
    for (at, _) in src.match_indices("__global__") {
        let mut rest = src[at + "__global__".len()..].trim_start();
        loop {
            if let Some(r) = rest.strip_prefix("void") {
                rest = r.trim_start();
            } else if let Some(r) = rest.strip_prefix("__launch_bounds__") {
                let close = r
                    .find(')')
                    .expect("__launch_bounds__ has a closing parenthesis");
                rest = r[close + 1..].trim_start();
            } else {
                break;
            }
        }
        let end = rest.find(|c| !is_ident(c)).unwrap_or(rest.len());
        let name = &rest[..end];
        let macro_param = !name.chars().any(|c| c.is_ascii_lowercase());
        if !name.is_empty() && !macro_param && rest[end..].trim_start().starts_with('(') {
            names.insert(name.to_string());
        }
    }
    names
}

/// Names guarded by `defined(BURN_OFFLOAD_ONLY_<name>)`.
fn selectable_entry_points(src: &str) -> BTreeSet<String> {
    let src = strip_comments(src);
    src.match_indices(&format!("defined({ONLY_PREFIX}"))
        .map(|(at, m)| {
            let rest = &src[at + m.len()..];
            rest[..rest.find(|c| !is_ident(c)).unwrap_or(rest.len())].to_string()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

fn ptx_entries(ptx: &str) -> BTreeSet<String> {
    ptx.match_indices(".entry ")
        .map(|(at, m)| {
            let rest = &ptx[at + m.len()..];
            rest[..rest.find(|c| !is_ident(c)).unwrap_or(rest.len())].to_string()
        })
        .collect()
}

/// The number of `.param`s of entry point `name` in `ptx`, if it is there.
fn entry_param_count(ptx: &str, name: &str) -> Option<usize> {
    let at = ptx.find(&format!(".entry {name}("))?;
    let rest = &ptx[at..];
    let list = &rest[..rest.find(')')?];
    Some(list.matches(".param").count())
}

/// Whether `ptx` calls the device function `name`: declared `.extern .func` and named as a
/// word on some other line (the `call` operand; its parameters are `name_param_N`, other words).
fn calls(ptx: &str, name: &str) -> bool {
    let names = |l: &str| l.split(|c: char| !is_ident(c)).any(|w| w == name);
    let (declarations, others): (Vec<&str>, Vec<&str>) = ptx
        .lines()
        .partition(|l| l.trim_start().starts_with(".extern .func"));
    declarations.into_iter().any(names) && others.into_iter().any(names)
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one source; `Ok((ptx, log))` or `Err(log)`.
fn compile(name: &str, src: &str, arch: &str) -> Result<(String, String), String> {
    let src = CString::new(src).expect("kernel sources have no NUL byte");
    let prog_name = CString::new(name).expect("file names have no NUL byte");
    let prog = result::create_program(&src, Some(&prog_name))
        .map_err(|e| format!("nvrtcCreateProgram failed: {e:?}"))?;
    // SAFETY: `prog` is a live program created above and destroyed once, at the end.
    unsafe {
        let compiled = result::compile_program(prog, &options(arch));
        let log = result::get_program_log(prog)
            .map(|l| c_chars_to_string(&l))
            .unwrap_or_else(|e| format!("(no log: {e:?})"));
        let out = match compiled {
            Ok(()) => result::get_ptx(prog)
                .map(|p| (c_chars_to_string(&p), log))
                .map_err(|e| format!("nvrtcGetPTX failed: {e:?}")),
            Err(e) => Err(format!("{e:?}\n{log}")),
        };
        result::destroy_program(prog).expect("nvrtcDestroyProgram");
        out
    }
}

/// One compilation to check.
struct Job {
    file: String,
    arch: &'static str,
    /// `Some(name)`: only this entry point is selected.
    only: Option<String>,
    source: String,
    /// Entry points that must be in the PTX.
    expected: BTreeSet<String>,
    /// Entry points that must not be in the PTX (the other selectable ones).
    unexpected: BTreeSet<String>,
    /// Device functions the PTX must call.
    calls: Vec<&'static str>,
}

enum Outcome {
    Ok(String),
    Failed(String),
    /// NVRTC is installed but cannot work (e.g. libnvrtc-builtins missing).
    Broken(String),
}

fn run(job: &Job) -> Outcome {
    let label = match &job.only {
        Some(name) => format!("{} [{}, only {name}]", job.file, job.arch),
        None => format!("{} [{}]", job.file, job.arch),
    };
    let (ptx, log) = match compile(&job.file, &job.source, job.arch) {
        Ok(out) => out,
        Err(log) if log.contains("builtins") && log.contains("failed to open") => {
            return Outcome::Broken(format!("NVRTC cannot load its builtins library: {log}"));
        }
        Err(log) => return Outcome::Failed(format!("{label}: compilation failed:\n{log}")),
    };
    let entries = ptx_entries(&ptx);
    let missing: Vec<_> = job.expected.difference(&entries).collect();
    let extra: Vec<_> = job.unexpected.intersection(&entries).collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("no `.entry` for {missing:?}"));
    }
    if !extra.is_empty() {
        problems.push(format!("entry selection ignored: also compiled {extra:?}"));
    }
    for (name, params) in ENTRY_PARAMS {
        if !entries.contains(*name) {
            continue;
        }
        match entry_param_count(&ptx, name) {
            Some(found) if found == *params => {}
            found => problems.push(format!(
                "{name} takes {found:?} parameters, its launcher passes {params}"
            )),
        }
    }
    for name in &job.calls {
        if !calls(&ptx, name) {
            problems.push(format!("the PTX does not call {name}"));
        }
    }
    if log.contains("warning") {
        problems.push(format!("warnings:\n{log}"));
    }
    if !problems.is_empty() {
        return Outcome::Failed(format!("{label}: {}", problems.join("; ")));
    }
    let resources: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Compiling entry") || l.contains("Used ") || l.contains("spill"))
        .map(str::trim)
        .collect();
    Outcome::Ok(format!(
        "{label}: OK, entries {entries:?}, {} bytes of PTX\n    {}",
        ptx.len(),
        resources.join("\n    ")
    ))
}

/// The jobs for one file: the whole file for every arch, and each selectable entry point alone
/// for the last arch (what a launcher compiles on Hopper).
fn jobs_for(path: &Path) -> Vec<Job> {
    let file = path.file_name().unwrap().to_string_lossy().into_owned();
    let src = std::fs::read_to_string(path).expect("readable kernel source");
    assert!(
        !strip_comments(&src).contains("#include"),
        "{file}: kernels must not #include anything (NVRTC runs with no include path)"
    );
    let declared = declared_entry_points(&src);
    let selectable = selectable_entry_points(&src);
    let mut expected: BTreeSet<String> = declared.union(&selectable).cloned().collect();
    for (f, names) in REQUIRED_ENTRY_POINTS {
        if *f == file {
            expected.extend(names.iter().map(|n| n.to_string()));
        }
    }
    assert!(
        !expected.is_empty(),
        "{file}: no __global__ entry point found"
    );
    let calls: Vec<&'static str> = REQUIRED_CALLS
        .iter()
        .filter(|(f, _)| *f == file)
        .flat_map(|(_, names)| names.iter().copied())
        .collect();
    let mut jobs: Vec<Job> = ARCHS
        .iter()
        .map(|&arch| Job {
            file: file.clone(),
            arch,
            only: None,
            source: src.clone(),
            expected: expected.clone(),
            unexpected: BTreeSet::new(),
            calls: calls.clone(),
        })
        .collect();
    for name in &selectable {
        jobs.push(Job {
            file: file.clone(),
            arch: ARCHS[ARCHS.len() - 1],
            only: Some(name.clone()),
            source: format!("#define {SELECT_DEFINE}\n#define {ONLY_PREFIX}{name}\n#line 1\n{src}"),
            expected: BTreeSet::from([name.clone()]),
            unexpected: selectable.iter().filter(|n| *n != name).cloned().collect(),
            calls: calls.clone(),
        });
    }
    jobs
}

#[test]
fn every_kernel_compiles_with_nvrtc() {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        unavailable("libnvrtc could not be loaded (searched LD_LIBRARY_PATH and the system)");
        return;
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two valid out-pointers.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .expect("nvrtcVersion");
    println!("NVRTC {major}.{minor}, options {:?}", options("sm_XX"));

    let mut files: Vec<PathBuf> = std::fs::read_dir(kernels_dir())
        .expect("src/inner/cuda/kernels exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .cu files in {:?}", kernels_dir());
    for (file, _) in REQUIRED_ENTRY_POINTS {
        assert!(
            files.iter().any(|p| p.ends_with(file)),
            "{file} is missing from {:?}",
            kernels_dir()
        );
    }
    let jobs: Vec<Job> = files.iter().flat_map(|p| jobs_for(p)).collect();

    // NVRTC programs are independent: compile on every core (ptxas dominates).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let queue = Mutex::new(jobs.iter().enumerate());
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers.min(jobs.len()) {
            s.spawn(|| {
                loop {
                    let Some((index, job)) = queue.lock().unwrap().next() else {
                        break;
                    };
                    let outcome = run(job);
                    outcomes.lock().unwrap().push((index, outcome));
                }
            });
        }
    });

    let mut outcomes = outcomes.into_inner().unwrap();
    outcomes.sort_by_key(|(index, _)| *index);
    let mut failures = Vec::new();
    for (_, outcome) in outcomes {
        match outcome {
            Outcome::Ok(report) => println!("{report}"),
            Outcome::Failed(report) => failures.push(report),
            Outcome::Broken(reason) => {
                unavailable(&reason);
                return;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} NVRTC compilations failed:\n\n{}",
        failures.len(),
        jobs.len(),
        failures.join("\n\n")
    );
}

#[test]
fn entry_point_parsers() {
    let src = r#"
        // extern "C" __global__ void commented_out(int* a) {}
        /* __global__ void also_commented() {} */
        extern "C" __global__ void plain(int* a) {}
        extern "C" __global__ void __launch_bounds__(256) bounded(int* a) {}
        extern "C" __global__ void name_##SUFFIX(int* a) {}
        #define ENTRY(NAME, T) extern "C" __global__ void NAME(T* a) {}
        #if !defined(BURN_OFFLOAD_SELECT_ENTRY) || defined(BURN_OFFLOAD_ONLY_selected)
        ENTRY(selected, float)
        #endif
    "#;
    assert_eq!(
        declared_entry_points(src),
        BTreeSet::from(["plain".to_string(), "bounded".to_string()])
    );
    assert_eq!(
        selectable_entry_points(src),
        BTreeSet::from(["selected".to_string()])
    );
    let ptx = ".visible .entry k1(\n.param .u64 a\n)\n.visible .entry k_2(";
    assert_eq!(
        ptx_entries(ptx),
        BTreeSet::from(["k1".to_string(), "k_2".to_string()])
    );
    assert_eq!(entry_param_count(ptx, "k1"), Some(1));
    assert_eq!(entry_param_count(ptx, "k3"), None);
    let ptx = ".visible .entry g(\n\t.param .u64 g_param_0,\n\t.param .align 8 .b8 \
               g_param_1[56]\n)\n.extern .func __assertfail\n(\n\t.param .b64 a\n)\n;\n\
               \tcall.uni \n\t__assertfail, \n\t(\n\tparam0\n\t);\n";
    assert_eq!(entry_param_count(ptx, "g"), Some(2));
    assert!(calls(ptx, "__assertfail"));
    assert!(!calls(ptx, "vprintf"));
    // Declared but never called does not count.
    let declared_only = ".extern .func __assertfail\n(\n\t.param .b64 a\n)\n;\n";
    assert!(!calls(declared_only, "__assertfail"));
}
