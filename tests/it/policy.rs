//! `OffloadPolicy`: vLLM's segment matching, the budget walk, the report and every bad input.

use crate::common;

use burn::backend::NdArray;
use burn::backend::ndarray::NdArrayDevice;
use burn_offload::policy::Placement;
use burn_offload::{OffloadBackend, OffloadDevice, OffloadError, OffloadMode, OffloadPolicy};
use common::{BLOCK_BYTES, NET_BYTES, NET_PARAMS, Net, init_states, offloaded_paths, placements};

type B = OffloadBackend<NdArray>;

const GIB: u64 = 1 << 30;

fn device() -> OffloadDevice<NdArrayDevice> {
    OffloadDevice::Device(NdArrayDevice::Cpu)
}

fn net() -> Net<B> {
    Net::new(&device())
}

fn filters(list: &[&str]) -> OffloadPolicy {
    OffloadPolicy::from_bytes(u64::MAX).params(list.iter().copied())
}

/// Applies `policy` to a fresh (lazy) `Net` and returns the offloaded paths.
fn offloaded_with(policy: &OffloadPolicy) -> Vec<String> {
    let (_, report) = policy.apply(net()).unwrap();
    offloaded_paths(&report)
}

fn paths(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Segment matching (vLLM's `cpu_offload_params`).

#[test]
fn filter_matches_whole_segments() {
    // (filters, path, expected)
    let table: &[(&[&str], &str, bool)] = &[
        (&["experts.w2_weight"], "mlp.experts.w2_weight", true),
        (&["experts.w2_weight"], "mlp.experts.w2_weight_scale", false),
        (&["experts.w2_weight"], "experts.w2_weight", true),
        (&["experts.w2_weight"], "mlp.experts.w13_weight", false),
        (&["mlp"], "layers.0.mlp.up.weight", true),
        (&["mlp"], "layers.0.mlp_norm.gamma", false),
        (&["mlp"], "mlp", true),
        (&["mlp"], "mlp.weight", true),
        (&["mlp"], "pre.mlp", true),
        // Multi-segment filters must match consecutive segments.
        (&["mlp.up"], "layers.0.mlp.up.weight", true),
        (&["mlp.up"], "layers.0.mlp.down.weight", false),
        (&["mlp.up"], "layers.0.mlp.upper.weight", false),
        (&["mlp.up"], "layers.0.mlp.x.up.weight", false),
        (&["layers.0.mlp.up.weight"], "layers.0.mlp.up.weight", true),
        (&["layers.1"], "layers.1.mlp.up.weight", true),
        (&["layers.1"], "layers.10.mlp.up.weight", false),
        (&["layers.1"], "layers.0.mlp.up.weight", false),
        // A prefix or suffix of a segment is not a match.
        (&["ml"], "layers.0.mlp.up.weight", false),
        (&["lp"], "layers.0.mlp.up.weight", false),
        (&["eight"], "layers.0.mlp.up.weight", false),
        (&["weight"], "layers.0.mlp.up.weight", true),
        (&["p.u"], "layers.0.mlp.up.weight", false),
        // Several filters: any of them.
        (&["attn", "mlp"], "layers.0.mlp.up.weight", true),
        (&["attn", "mlp"], "layers.0.attn.wq.weight", true),
        (&["attn", "mlp"], "layers.0.mlp_norm.gamma", false),
        // No filter: everything is eligible.
        (&[], "layers.0.mlp.up.weight", true),
        (&[], "layers.0.mlp_norm.gamma", true),
        (&[], "anything", true),
    ];
    for &(list, path, expected) in table {
        let policy = filters(list);
        assert_eq!(
            policy.matches(path),
            expected,
            "filters {list:?} on path {path:?}"
        );
    }
}

#[test]
fn filters_restrict_what_is_offloaded() {
    let mlp = [
        "layers.0.mlp.up.weight",
        "layers.0.mlp.up.bias",
        "layers.0.mlp.down.weight",
        "layers.0.mlp.down.bias",
        "layers.1.mlp.up.weight",
        "layers.1.mlp.up.bias",
        "layers.1.mlp.down.weight",
        "layers.1.mlp.down.bias",
    ];
    assert_eq!(offloaded_with(&filters(&["mlp"])), paths(&mlp));
    assert_eq!(
        offloaded_with(&filters(&["mlp_norm"])),
        paths(&[
            "layers.0.mlp_norm.gamma",
            "layers.0.mlp_norm.beta",
            "layers.1.mlp_norm.gamma",
            "layers.1.mlp_norm.beta",
        ])
    );
    assert_eq!(
        offloaded_with(&filters(&["layers.1.mlp.up"])),
        paths(&["layers.1.mlp.up.weight", "layers.1.mlp.up.bias"])
    );
    assert_eq!(
        offloaded_with(&filters(&["head", "layers.0.mlp.down.weight"])),
        paths(&["layers.0.mlp.down.weight", "head.weight", "head.bias"])
    );
    assert_eq!(
        offloaded_with(&filters(&["weight"])),
        paths(&[
            "layers.0.mlp.up.weight",
            "layers.0.mlp.down.weight",
            "layers.1.mlp.up.weight",
            "layers.1.mlp.down.weight",
            "head.weight",
        ])
    );
    assert!(offloaded_with(&filters(&["attn"]).allow_unmatched(true)).is_empty());
    assert!(offloaded_with(&filters(&["ml"]).allow_unmatched(true)).is_empty());

    // The budget only counts eligible parameters: 600 bytes of `mlp` are up.weight (512) and,
    // as the check comes before each parameter, up.bias (64) and down.weight (512) too.
    let policy = OffloadPolicy::from_bytes(600).params(["mlp"]);
    assert_eq!(
        offloaded_with(&policy),
        paths(&[
            "layers.0.mlp.up.weight",
            "layers.0.mlp.up.bias",
            "layers.0.mlp.down.weight",
        ])
    );
}

#[test]
fn exact_paths_select_only_those_parameters() {
    // `layers.0.mlp.up.weight` as a filter would also match a deeper `x.layers.0.mlp.up.weight`;
    // as a path it is that parameter only, and a segment of it matches nothing.
    let policy = OffloadPolicy::from_bytes(u64::MAX).paths(["layers.0.mlp.up.weight", "head.bias"]);
    assert_eq!(
        offloaded_with(&policy),
        paths(&["layers.0.mlp.up.weight", "head.bias"])
    );
    let error = OffloadPolicy::from_bytes(u64::MAX)
        .paths(["layers.0.mlp"])
        .apply(net())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("`layers.0.mlp` (did you mean `layers.0.mlp.up.bias`"),
        "{error}"
    );
    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .paths(["layers.0.mlp"])
        .allow_unmatched(true)
        .apply(net())
        .unwrap();
    assert!(offloaded_paths(&report).is_empty());
    assert!(
        report
            .warnings
            .iter()
            .any(|w| w
                .contains("parameter paths [\"layers.0.mlp\"] name no parameter of this module")),
        "{:?}",
        report.warnings
    );
    // With filters too: either selects.
    let policy = filters(&["head"]).paths(["layers.1.mlp.down.bias"]);
    assert_eq!(
        offloaded_with(&policy),
        paths(&["layers.1.mlp.down.bias", "head.weight", "head.bias"])
    );
    // From a file, and back.
    let from_toml = OffloadPolicy::from_toml(
        "max_bytes = 1000\npaths = [\"layers.0.mlp.up.weight\", \"head.bias\"]",
    )
    .unwrap();
    assert_eq!(
        from_toml,
        OffloadPolicy::from_bytes(1000).paths(["layers.0.mlp.up.weight", "head.bias"])
    );
    let json = serde_json::to_string(&from_toml).unwrap();
    assert_eq!(
        serde_json::from_str::<OffloadPolicy>(&json).unwrap(),
        from_toml
    );
    // Validated as filters are.
    assert!(matches!(
        OffloadPolicy::from_toml("paths = [\"head..bias\"]"),
        Err(OffloadError::InvalidParamFilter { .. })
    ));
}

// ---------------------------------------------------------------------------------------------
// The budget walk.

#[test]
fn report_lists_every_param_in_module_order() {
    let (_, report) = OffloadPolicy::from_bytes(0).apply(net()).unwrap();
    let rows: Vec<(&str, &[usize], u64)> = report
        .params
        .iter()
        .map(|p| (p.path.as_str(), p.shape.as_slice(), p.bytes))
        .collect();
    assert_eq!(rows, NET_PARAMS.to_vec());
    assert!(report.params.iter().all(|p| p.dtype == "f32"));
    assert_eq!(report.total_bytes(), NET_BYTES);
    assert_eq!(NET_BYTES, 2512);
}

#[test]
fn zero_budget_offloads_nothing() {
    let (model, report) = OffloadPolicy::from_bytes(0).apply(net()).unwrap();
    assert_eq!(report.offloaded_tensors(), 0);
    assert_eq!(report.offloaded_bytes(), 0);
    assert!(
        report
            .params
            .iter()
            .all(|p| p.placement == Placement::Device)
    );
    assert!(report.params.iter().all(|p| !p.moved));
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    assert!(placements(&model).iter().all(|(_, host)| !host));

    let (_, report) = OffloadPolicy::from_gib(0.0).unwrap().apply(net()).unwrap();
    assert_eq!(report.offloaded_tensors(), 0);
}

#[test]
fn budget_that_fits_a_layer_exactly_offloads_that_layer() {
    let (model, report) = OffloadPolicy::from_bytes(BLOCK_BYTES).apply(net()).unwrap();
    let layer0: Vec<String> = NET_PARAMS[..6].iter().map(|p| p.0.to_string()).collect();
    assert_eq!(offloaded_paths(&report), layer0);
    assert_eq!(report.offloaded_bytes(), BLOCK_BYTES);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    // The model agrees with the report.
    let placed = placements(&model);
    for ((path, host), row) in placed.iter().zip(&report.params) {
        assert_eq!(path, &row.path);
        assert_eq!(*host, row.placement == Placement::Host, "{path}");
    }

    // One byte more and the first parameter of the next layer is offloaded too (it crosses).
    let (_, report) = OffloadPolicy::from_bytes(BLOCK_BYTES + 1)
        .apply(net())
        .unwrap();
    let mut expected = layer0;
    expected.push("layers.1.mlp_norm.gamma".into());
    assert_eq!(offloaded_paths(&report), expected);
}

#[test]
fn budget_ending_inside_a_layer_offloads_the_crossing_param() {
    // gamma (32) and beta (32) bring the total to 64 < 100, so up.weight (512) is still
    // offloaded and crosses the budget; then nothing more, not even the small up.bias.
    let (model, report) = OffloadPolicy::from_bytes(100).apply(net()).unwrap();
    assert_eq!(
        offloaded_paths(&report),
        paths(&[
            "layers.0.mlp_norm.gamma",
            "layers.0.mlp_norm.beta",
            "layers.0.mlp.up.weight",
        ])
    );
    assert_eq!(report.offloaded_bytes(), 576);
    assert!(report.offloaded_bytes() > report.max_bytes);
    assert!(!report.is_offloaded("layers.0.mlp.up.bias"));
    assert!(report.is_offloaded("layers.0.mlp.up.weight"));
    // A module partly offloaded: up.weight in host memory, up.bias on the device.
    let up = &model.layers[0].mlp.up;
    assert!(common::on_host(&up.weight.val()));
    assert!(!common::on_host(&up.bias.as_ref().unwrap().val()));

    // A budget ending exactly at a parameter's end stops before the next one.
    let (_, report) = OffloadPolicy::from_bytes(576).apply(net()).unwrap();
    assert_eq!(report.offloaded_bytes(), 576);
    let (_, report) = OffloadPolicy::from_bytes(577).apply(net()).unwrap();
    assert_eq!(report.offloaded_bytes(), 640);
}

#[test]
fn budget_larger_than_the_model_offloads_everything_with_a_warning() {
    let (model, report) = OffloadPolicy::from_gib(1.0).unwrap().apply(net()).unwrap();
    assert_eq!(report.offloaded_tensors(), NET_PARAMS.len());
    assert_eq!(report.offloaded_bytes(), NET_BYTES);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(
        report.warnings[0].contains("larger"),
        "{}",
        report.warnings[0]
    );
    assert!(placements(&model).iter().all(|(_, host)| *host));
    assert!(report.to_string().contains("warning: "));

    // Exactly the model's size: everything, and no warning.
    let (_, report) = OffloadPolicy::from_bytes(NET_BYTES).apply(net()).unwrap();
    assert_eq!(report.offloaded_bytes(), NET_BYTES);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);

    // The warning compares with the *eligible* bytes.
    let (_, report) = OffloadPolicy::from_bytes(NET_BYTES)
        .params(["mlp"])
        .apply(net())
        .unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    // The `mlp` parameters are 2 × 1120 bytes.
    let (_, report) = OffloadPolicy::from_bytes(2 * 1120)
        .params(["mlp"])
        .apply(net())
        .unwrap();
    assert_eq!(report.offloaded_bytes(), 2 * 1120);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

#[test]
fn min_tensor_bytes_keeps_small_params_resident() {
    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .min_tensor_bytes(100)
        .apply(net())
        .unwrap();
    assert_eq!(
        offloaded_paths(&report),
        paths(&[
            "layers.0.mlp.up.weight",
            "layers.0.mlp.down.weight",
            "layers.1.mlp.up.weight",
            "layers.1.mlp.down.weight",
            "head.weight",
        ])
    );
    // Parameters of exactly the threshold are eligible.
    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .min_tensor_bytes(128)
        .apply(net())
        .unwrap();
    assert!(report.is_offloaded("head.weight"));
    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .min_tensor_bytes(129)
        .apply(net())
        .unwrap();
    assert!(!report.is_offloaded("head.weight"));
    assert_eq!(report.offloaded_tensors(), 4);

    // Small parameters do not count towards the budget either.
    let (_, report) = OffloadPolicy::from_bytes(600)
        .min_tensor_bytes(100)
        .apply(net())
        .unwrap();
    assert_eq!(
        offloaded_paths(&report),
        paths(&["layers.0.mlp.up.weight", "layers.0.mlp.down.weight"])
    );
}

#[test]
fn applying_twice_is_idempotent() {
    let policy = OffloadPolicy::from_bytes(1000);
    let (model, first) = policy.apply(net()).unwrap();
    // Everything started on the device: exactly the offloaded ones moved.
    for p in &first.params {
        assert_eq!(p.moved, p.placement == Placement::Host, "{}", p.path);
    }
    assert!(first.offloaded_tensors() > 0);

    // Lazy parameters: the second walk sees them on the host already.
    let (model, second) = policy.apply(model).unwrap();
    assert_eq!(
        first
            .params
            .iter()
            .map(|p| (&p.path, p.placement))
            .collect::<Vec<_>>(),
        second
            .params
            .iter()
            .map(|p| (&p.path, p.placement))
            .collect::<Vec<_>>()
    );
    assert!(second.params.iter().all(|p| !p.moved), "{second}");
    assert!(init_states(&model).iter().all(|(_, init)| !init));

    // Initialised parameters: same again, and the values do not change.
    let before = common::values(&model);
    let placed = placements(&model);
    let (model, third) = policy.apply(model).unwrap();
    assert!(third.params.iter().all(|p| !p.moved), "{third}");
    assert_eq!(
        third.params,
        first
            .params
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.moved = false;
                p
            })
            .collect::<Vec<_>>()
    );
    assert_eq!(placements(&model), placed);
    common::assert_same_values(&common::values(&model), &before);
}

#[test]
fn a_smaller_budget_moves_params_back_to_the_device() {
    let (model, _) = OffloadPolicy::from_bytes(u64::MAX).apply(net()).unwrap();
    let _ = common::values(&model); // initialise
    let (model, report) = OffloadPolicy::from_bytes(BLOCK_BYTES).apply(model).unwrap();
    for (i, p) in report.params.iter().enumerate() {
        let host = i < 6;
        assert_eq!(p.placement == Placement::Host, host, "{}", p.path);
        assert_eq!(p.moved, !host, "{}", p.path);
    }
    for ((path, host), i) in placements(&model).into_iter().zip(0..) {
        assert_eq!(host, i < 6, "{path}");
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

#[test]
fn report_totals_and_display() {
    let (_, report) = OffloadPolicy::from_bytes(BLOCK_BYTES)
        .mode(OffloadMode::Copy)
        .apply(net())
        .unwrap();
    assert_eq!(report.offloaded_tensors(), 6);
    assert_eq!(report.offloaded_bytes(), BLOCK_BYTES);
    assert_eq!(report.total_bytes(), NET_BYTES);
    assert_eq!(report.max_bytes, BLOCK_BYTES);
    assert_eq!(report.mode, OffloadMode::Copy);
    assert_eq!(report.offloaded_gib(), BLOCK_BYTES as f64 / GIB as f64);
    assert_eq!(report.total_gib(), NET_BYTES as f64 / GIB as f64);
    assert!(report.is_offloaded("layers.0.mlp.down.bias"));
    assert!(!report.is_offloaded("layers.1.mlp_norm.gamma"));
    assert!(!report.is_offloaded("no.such.param"));

    let summary = report.summary();
    assert!(
        summary.starts_with("Total CPU offloaded parameters: "),
        "{summary}"
    );
    assert!(summary.contains("in 6 of 14 tensors"), "{summary}");
    assert!(summary.contains("mode copy"), "{summary}");
    // Sizes in human units (a tiny model is not `0.000 GiB`).
    assert_eq!(
        summary,
        "Total CPU offloaded parameters: 1.16 KiB in 6 of 14 tensors (2.45 KiB in all, budget \
         1.16 KiB per device, mode copy)"
    );

    let text = report.to_string();
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("Total CPU offloaded parameters"),
        "{text}"
    );
    for (path, _, bytes) in NET_PARAMS {
        let line = text
            .lines()
            .find(|l| l.split_whitespace().next() == Some(path))
            .unwrap_or_else(|| panic!("no line for {path} in\n{text}"));
        assert!(line.contains(&bytes.to_string()), "{line}");
        let placement = if report.is_offloaded(path) {
            "host"
        } else {
            "device"
        };
        assert!(line.trim_end().ends_with(placement), "{line}");
    }
}

#[test]
fn a_prefetch_lookahead_below_a_tensor_warns_with_the_fix() {
    // The largest parameters (the mlp's, [8, 16] f32) are 512 bytes.
    let prefetch = OffloadMode::prefetch;
    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(prefetch(256))
        .apply(net())
        .unwrap();
    assert_eq!(report.prefetch_lookahead_bytes, Some(256));
    let warned: Vec<_> = report
        .warnings
        .iter()
        .filter(|w| w.contains("lookahead"))
        .collect();
    assert_eq!(warned.len(), 1, "{:?}", report.warnings);
    assert!(
        warned[0].starts_with("4 offloaded tensors") && warned[0].contains("prefetch:1024"),
        "{}",
        warned[0]
    );

    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(prefetch(512))
        .apply(net())
        .unwrap();
    assert_eq!(report.prefetch_lookahead_bytes, Some(512));
    assert!(
        report.warnings.iter().all(|w| !w.contains("lookahead")),
        "{:?}",
        report.warnings
    );
    // Only copies are prefetched.
    let (_, report) = OffloadPolicy::from_bytes(u64::MAX)
        .mode(OffloadMode::Uva)
        .apply(net())
        .unwrap();
    assert_eq!(report.prefetch_lookahead_bytes, None);
}

#[test]
fn report_round_trips_through_json() {
    let (_, report) = OffloadPolicy::from_bytes(100)
        .mode(OffloadMode::Uva)
        .apply(net())
        .unwrap();
    let (_, warned) = OffloadPolicy::from_gib(2.0).unwrap().apply(net()).unwrap();
    for report in [report, warned] {
        let json = serde_json::to_string(&report).unwrap();
        let back: burn_offload::OffloadReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["params"][0]["path"], "layers.0.mlp_norm.gamma");
        assert_eq!(value["params"][0]["placement"], "host");
        assert_eq!(value["params"][13]["dtype"], "f32");
        assert_eq!(value["max_bytes"], report.max_bytes);
        assert_eq!(value["mode"], report.mode.to_string());
    }
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[test]
fn invalid_budgets_are_rejected() {
    for value in [f64::NAN, -1.0, -1e-9, f64::INFINITY, f64::NEG_INFINITY] {
        match OffloadPolicy::from_gib(value) {
            Err(OffloadError::InvalidBudget { value: got }) => {
                assert!(got.to_bits() == value.to_bits(), "{got} vs {value}")
            }
            other => panic!("from_gib({value}) gave {other:?}"),
        }
    }
    let err = OffloadPolicy::from_gib(-2.0).unwrap_err();
    assert!(err.to_string().contains("-2"), "{err}");
    assert_eq!(OffloadPolicy::from_gib(1.5).unwrap().max_bytes, 3 * GIB / 2);
    assert_eq!(OffloadPolicy::from_gib(0.0).unwrap().max_bytes, 0);
    assert_eq!(OffloadPolicy::from_gib(12.0).unwrap().max_gib(), 12.0);

    // In policy files too.
    for text in ["max_gib = nan", "max_gib = -1.0", "max_gib = inf"] {
        assert!(
            matches!(
                OffloadPolicy::from_toml(text),
                Err(OffloadError::InvalidBudget { .. })
            ),
            "{text}: {:?}",
            OffloadPolicy::from_toml(text)
        );
    }
    assert!(matches!(
        OffloadPolicy::from_json(r#"{"max_gib": -0.5}"#),
        Err(OffloadError::InvalidBudget { value }) if value == -0.5
    ));
}

#[test]
fn budgets_too_large_to_represent_are_rejected() {
    let max = OffloadPolicy::MAX_GIB;
    assert_eq!(max, 17179869183.0);
    // The largest accepted budget is exact, just below u64::MAX bytes.
    assert_eq!(
        OffloadPolicy::from_gib(max).unwrap().max_bytes,
        (u64::MAX >> 30) << 30
    );
    for value in [1e30, max + 1.0, 2.0f64.powi(34), f64::MAX] {
        match OffloadPolicy::from_gib(value) {
            Err(OffloadError::BudgetTooLarge { value: got, max: m }) => {
                assert_eq!((got, m), (value, max));
            }
            other => panic!("from_gib({value}) gave {other:?}"),
        }
    }
    let err = OffloadPolicy::from_gib(1e30).unwrap_err().to_string();
    assert!(
        err.contains("the largest accepted budget is 17179869183 GiB"),
        "{err}"
    );
    // In policy files and through serde too.
    let too_large = |r: Result<OffloadPolicy, OffloadError>| match r {
        Err(OffloadError::BudgetTooLarge { value, .. }) => value == 1e30,
        _ => false,
    };
    assert!(too_large(OffloadPolicy::from_toml("max_gib = 1e30")));
    assert!(too_large(OffloadPolicy::from_json(r#"{"max_gib": 1e30}"#)));
    let err = serde_json::from_str::<OffloadPolicy>(r#"{"max_gib": 1e30}"#).unwrap_err();
    assert!(err.to_string().contains("17179869183 GiB"), "{err}");
}

#[test]
fn a_prefetch_lookahead_of_zero_is_rejected() {
    let zero = OffloadMode::prefetch(0);
    assert_eq!(
        "prefetch:0".parse::<OffloadMode>(),
        Err(OffloadError::ZeroPrefetchLookahead)
    );
    let message = OffloadError::ZeroPrefetchLookahead.to_string();
    assert!(
        message.contains("give a positive lookahead") && message.contains("use `copy`"),
        "{message}"
    );
    // The builder: refused by validate and apply.
    let policy = OffloadPolicy::from_bytes(u64::MAX).mode(zero);
    assert_eq!(policy.validate(), Err(OffloadError::ZeroPrefetchLookahead));
    assert_eq!(
        policy.apply(net()).map(|_| ()),
        Err(OffloadError::ZeroPrefetchLookahead)
    );
    // Policy files, as a string or in OffloadMode's serde form, and serde itself.
    for result in [
        OffloadPolicy::from_toml("mode = \"prefetch:0\""),
        OffloadPolicy::from_toml("mode = { prefetch = { lookahead_bytes = 0 } }"),
        OffloadPolicy::from_json(r#"{"mode": "prefetch:0"}"#),
        OffloadPolicy::from_json(r#"{"mode": {"prefetch": {"lookahead_bytes": 0}}}"#),
    ] {
        assert_eq!(result, Err(OffloadError::ZeroPrefetchLookahead));
    }
    for json in [
        r#"{"mode": "prefetch:0"}"#,
        r#"{"mode": {"prefetch": {"lookahead_bytes": 0}}}"#,
    ] {
        let err = serde_json::from_str::<OffloadPolicy>(json).unwrap_err();
        assert!(
            err.to_string().contains("positive lookahead"),
            "{json}: {err}"
        );
    }
    // One byte is a (tiny) lookahead.
    assert!(
        OffloadPolicy::from_bytes(1)
            .mode(OffloadMode::prefetch(1))
            .validate()
            .is_ok()
    );
}

#[test]
fn a_filter_matching_no_parameter_is_an_error_naming_the_closest_segments() {
    let error = filters(&["mlpp", "mlp"]).apply(net()).unwrap_err();
    assert!(
        matches!(&error, OffloadError::UnmatchedFilters { unmatched } if unmatched == "`mlpp` (did you mean `mlp`?)"),
        "{error}"
    );
    let message = error.to_string();
    assert!(message.contains("allow_unmatched(true)"), "{message}");
    // A family's name for a part suggests this model's name for it.
    let error = filters(&["ffn"]).apply(net()).unwrap_err().to_string();
    assert!(error.contains("`ffn` (did you mean `mlp`?)"), "{error}");
    // From a policy file too.
    let policy = OffloadPolicy::from_toml("max_gib = 1.0\nparams = [\"attn\"]").unwrap();
    assert!(policy.apply(net()).is_err());
}

#[test]
fn allowed_unmatched_filters_get_their_own_warning() {
    let (_, report) = filters(&["mlpp"])
        .allow_unmatched(true)
        .apply(net())
        .unwrap();
    assert_eq!(report.offloaded_tensors(), 0);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let w = &report.warnings[0];
    assert!(
        w.starts_with("parameter filter `mlpp` matches no parameter;"),
        "{w}"
    );
    assert!(!w.contains("all of them are offloaded"), "{w}");
    // Several, one of which matches: the others are named together.
    let policy = OffloadPolicy::from_toml(
        "max_gib = 1.0\nparams = [\"attn\", \"mlp\", \"ml\"]\nallow_unmatched = true",
    )
    .unwrap();
    let (_, report) = policy.apply(net()).unwrap();
    assert!(
        report.warnings[0].starts_with("parameter filters `attn`, `ml` match no parameter"),
        "{:?}",
        report.warnings
    );
    // Every filter matching something: no such warning.
    let (_, report) = OffloadPolicy::from_bytes(BLOCK_BYTES)
        .params(["mlp", "head"])
        .apply(net())
        .unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

const BAD_FILTERS: &[&str] = &["", "mlp..up", ".mlp", "mlp.", ".", "ml p", "mlp.*"];

#[test]
fn invalid_filters_are_rejected_by_apply() {
    for &bad in BAD_FILTERS {
        let result = OffloadPolicy::from_bytes(u64::MAX)
            .params(["mlp", bad])
            .apply(net());
        match result {
            Err(OffloadError::InvalidParamFilter { filter, reason }) => {
                assert_eq!(filter, bad);
                assert!(!reason.is_empty());
            }
            Err(e) => panic!("{bad:?}: wrong error {e}"),
            Ok((_, report)) => panic!("{bad:?} accepted:\n{report}"),
        }
        assert!(matches!(
            OffloadPolicy::from_bytes(1).params([bad]).validate(),
            Err(OffloadError::InvalidParamFilter { .. })
        ));
    }
}

#[test]
fn invalid_filters_are_rejected_by_parse_params() {
    assert_eq!(
        OffloadPolicy::parse_params("mlp, attn.wq").unwrap(),
        paths(&["mlp", "attn.wq"])
    );
    assert_eq!(
        OffloadPolicy::parse_params("experts.w2_weight").unwrap(),
        paths(&["experts.w2_weight"])
    );
    for (list, bad) in [
        ("", ""),
        ("mlp,,up", ""),
        ("mlp,", ""),
        ("mlp..up", "mlp..up"),
        (".mlp", ".mlp"),
        ("attn,mlp.", "mlp."),
        ("mlp.*", "mlp.*"),
    ] {
        match OffloadPolicy::parse_params(list) {
            Err(OffloadError::InvalidParamFilter { filter, .. }) => {
                assert_eq!(filter, bad, "{list:?}")
            }
            other => panic!("parse_params({list:?}) gave {other:?}"),
        }
    }
    // In policy files too.
    assert!(matches!(
        OffloadPolicy::from_toml("max_bytes = 1\nparams = [\"mlp..up\"]"),
        Err(OffloadError::InvalidParamFilter { .. })
    ));
    assert!(matches!(
        OffloadPolicy::from_json(r#"{"max_bytes": 1, "params": [""]}"#),
        Err(OffloadError::InvalidParamFilter { .. })
    ));
}

#[test]
fn policy_files_parse() {
    let json = OffloadPolicy::from_json(
        r#"{"max_bytes": 1234, "params": ["mlp"], "min_tensor_bytes": 64,
            "mode": "Copy", "pin_memory": false}"#,
    )
    .unwrap();
    assert_eq!(
        json,
        OffloadPolicy::from_bytes(1234)
            .params(["mlp"])
            .min_tensor_bytes(64)
            .mode(OffloadMode::Copy)
            .pin_memory(false)
    );
    let toml = OffloadPolicy::from_toml("max_gib = 0.5\nmode = \"uva\"").unwrap();
    assert_eq!(toml.max_bytes, GIB / 2);
    assert_eq!(toml.mode, OffloadMode::Uva);
    assert!(toml.pin_memory);
    assert!(toml.params.is_empty());
    assert_eq!(
        OffloadPolicy::from_toml("").unwrap(),
        OffloadPolicy::default()
    );
    assert_eq!(OffloadPolicy::default().mode, OffloadMode::Auto);
}

#[test]
fn unknown_modes_are_rejected() {
    let expect_unknown = |result: Result<OffloadPolicy, OffloadError>, given: &str| match result {
        Err(OffloadError::UnknownMode { given: g }) => assert_eq!(g, given),
        other => panic!("mode {given:?} gave {other:?}"),
    };
    expect_unknown(
        OffloadPolicy::from_json(r#"{"max_gib": 1.0, "mode": "fast"}"#),
        "fast",
    );
    expect_unknown(
        OffloadPolicy::from_toml("max_gib = 1.0\nmode = \"zero-copy\""),
        "zero-copy",
    );
    expect_unknown(OffloadPolicy::from_toml("mode = \"\""), "");
    assert!(matches!(
        "uvm".parse::<OffloadMode>(),
        Err(OffloadError::UnknownMode { .. })
    ));
    assert_eq!(" UVA ".parse::<OffloadMode>().unwrap(), OffloadMode::Uva);
}

#[test]
fn malformed_policy_files_are_rejected() {
    let expect_parse =
        |result: Result<OffloadPolicy, OffloadError>, format: &str, what: &str| match result {
            Err(OffloadError::PolicyParse { format: f, message }) => {
                assert_eq!(f, format, "{what}: {message}");
                assert!(!message.is_empty());
                message
            }
            other => panic!("{what} gave {other:?}"),
        };
    let message = expect_parse(
        OffloadPolicy::from_json(r#"{"max_gib": 1.0, "cpu_offload_gb": 2}"#),
        "json",
        "unknown JSON field",
    );
    assert!(message.contains("cpu_offload_gb"), "{message}");
    let message = expect_parse(
        OffloadPolicy::from_toml("max_gib = 1.0\nbudget = 2"),
        "toml",
        "unknown TOML field",
    );
    assert!(message.contains("budget"), "{message}");
    expect_parse(
        OffloadPolicy::from_json(r#"{"max_bytes": 10, "max_gib": 1.0}"#),
        "policy",
        "both budgets in JSON",
    );
    expect_parse(
        OffloadPolicy::from_toml("max_bytes = 10\nmax_gib = 1.0"),
        "policy",
        "both budgets in TOML",
    );
    expect_parse(
        OffloadPolicy::from_json(r#"{"max_bytes": "ten"}"#),
        "json",
        "wrong type",
    );
    expect_parse(OffloadPolicy::from_json("{"), "json", "truncated JSON");
    expect_parse(OffloadPolicy::from_toml("max_gib = "), "toml", "bad TOML");
    expect_parse(
        OffloadPolicy::from_json(r#"{"max_bytes": -1}"#),
        "json",
        "negative bytes",
    );
}

#[test]
fn serde_deserialisation_is_validated_like_policy_files() {
    let de = |json: &str| serde_json::from_str::<OffloadPolicy>(json);
    for (json, expected) in [
        (
            r#"{"max_bytes": 1, "params": ["mlp..up"]}"#,
            "invalid parameter filter \"mlp..up\"",
        ),
        (r#"{"params": [""]}"#, "invalid parameter filter \"\""),
        (
            r#"{"max_bytes": 10, "max_gib": 1.0}"#,
            "give either `max_bytes` or `max_gib`, not both",
        ),
        (r#"{"mode": "fast"}"#, "unknown offload mode \"fast\""),
        (r#"{"mode": "prefetch:0"}"#, "positive lookahead"),
        (r#"{"max_gib": 1e30}"#, "too large"),
        (r#"{"max_gib": -1.0}"#, "invalid offload budget -1 GiB"),
        (r#"{"max_gb": 1.0}"#, "unknown field `max_gb`"),
        (r#"{"mode": 3}"#, "an offload mode"),
        (
            r#"{"mode": {"prefetch": {"lookahead": 4}}}"#,
            "lookahead_bytes",
        ),
    ] {
        let err = de(json).unwrap_err().to_string();
        assert!(err.contains(expected), "{json}: {err}");
    }
    // The same as from_json where the input is valid, including the file form of a mode.
    for json in [
        r#"{"max_gib": 0.5, "params": ["mlp"], "mode": "Copy", "pin_memory": false}"#,
        r#"{"max_bytes": 1234, "mode": "prefetch:4096"}"#,
        r#"{"mode": {"prefetch": {"lookahead_bytes": 4096}}}"#,
        r#"{"mode": "prefetch"}"#,
        "{}",
    ] {
        assert_eq!(de(json).unwrap(), OffloadPolicy::from_json(json).unwrap());
    }
    assert_eq!(
        OffloadPolicy::from_toml("mode = { prefetch = { lookahead_bytes = 4096 } }")
            .unwrap()
            .mode,
        OffloadMode::prefetch(4096)
    );
}

#[test]
fn policies_round_trip_through_serde_in_every_mode() {
    let modes = [
        OffloadMode::Uva,
        OffloadMode::Copy,
        OffloadMode::Auto,
        OffloadMode::prefetch(1),
        "prefetch".parse().unwrap(),
    ];
    for mode in modes {
        for policy in [
            OffloadPolicy::from_bytes(12345)
                .params(["mlp", "attn.wq"])
                .min_tensor_bytes(64)
                .mode(mode)
                .pin_memory(false),
            OffloadPolicy::from_bytes(u64::MAX).mode(mode),
        ] {
            let json = serde_json::to_string(&policy).unwrap();
            let back: OffloadPolicy = serde_json::from_str(&json).unwrap();
            assert_eq!(back, policy, "{json}");
            assert_eq!(OffloadPolicy::from_json(&json).unwrap(), policy, "{json}");
            let value = serde_json::to_value(&policy).unwrap();
            assert_eq!(value["mode"], serde_json::to_value(mode).unwrap());
        }
        let policy = OffloadPolicy::from_gib(1.5)
            .unwrap()
            .params(["mlp"])
            .mode(mode);
        let toml = toml::to_string(&policy).unwrap();
        assert_eq!(OffloadPolicy::from_toml(&toml).unwrap(), policy, "{toml}");
        let back: OffloadPolicy = toml::from_str(&toml).unwrap();
        assert_eq!(back, policy, "{toml}");
    }
}

/// `(target, message)` of every warning logged in this process.
static LOGGED_WARNINGS: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

struct WarningCapture;

impl log::Log for WarningCapture {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if record.level() == log::Level::Warn {
            let entry = (record.target().to_string(), record.args().to_string());
            LOGGED_WARNINGS.lock().unwrap().push(entry);
        }
    }

    fn flush(&self) {}
}

#[test]
fn report_warnings_are_logged_under_their_own_target() {
    common::own_process!("installs the process's logger (there is one per process)");
    // The only logger of this process; other warnings are told apart by the filter.
    log::set_logger(&WarningCapture).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let filter = "only_in_the_log_target_test";
    let (_, report) = filters(&[filter])
        .allow_unmatched(true)
        .apply(net())
        .unwrap();
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let logged: Vec<_> = LOGGED_WARNINGS
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, message)| message.contains(filter))
        .cloned()
        .collect();
    // Logged once, under the target a program that prints the report can turn off.
    assert_eq!(
        logged,
        [(
            burn_offload::policy::WARNINGS_LOG_TARGET.to_string(),
            report.warnings[0].clone()
        )]
    );
    // Under the crate's prefix, so `RUST_LOG=burn_offload=warn` still shows them.
    assert!(burn_offload::policy::WARNINGS_LOG_TARGET.starts_with("burn_offload::"));

    // A lost placement: a `Module::map` that computes new values on the device replaces the
    // offloaded `head` parameters. The next forward logs one warning naming both and the fix;
    // later forwards log nothing more.
    struct Rescale;
    impl burn::module::ModuleMapper<B> for Rescale {
        fn map_float<const D: usize>(
            &mut self,
            param: burn::module::Param<burn::tensor::Tensor<B, D>>,
        ) -> burn::module::Param<burn::tensor::Tensor<B, D>> {
            param.map(|t| t.mul_scalar(1.0))
        }
    }
    let (model, report) = filters(&["head"]).apply(net()).unwrap();
    let model = burn::module::Module::map(model, &mut Rescale);
    let input = || burn::tensor::Tensor::<B, 3>::zeros([1, 2, common::D_MODEL], &device());
    model.forward(input());
    model.forward(input());
    let lost: Vec<_> = LOGGED_WARNINGS
        .lock()
        .unwrap()
        .iter()
        .filter(|(target, _)| target == burn_offload::LOST_PLACEMENT_LOG_TARGET)
        .map(|(_, message)| message.clone())
        .collect();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert!(
        lost[0].contains("`head.weight`, `head.bias`"),
        "{}",
        lost[0]
    );
    assert!(
        lost[0].contains("OffloadOptimizer::new(optimizer, &report)"),
        "{}",
        lost[0]
    );
    assert_eq!(
        report.context().unwrap().lost_placements(),
        ["head.weight", "head.bias"]
    );
}
