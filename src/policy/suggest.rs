//! Suggestions for a filter or path that matches no parameter: the closest dotted segments (or
//! full paths) the model does have, by edit distance and by the names models commonly give
//! the same part (`mlp` / `feed_forward` / `ffn`).

use std::collections::BTreeSet;

/// At most this many suggestions per filter.
const MAX_SUGGESTIONS: usize = 3;

/// Names different model families give the same part; a filter in one group suggests the
/// model's segments in the same group.
const SYNONYMS: &[&[&str]] = &[
    &[
        "mlp",
        "ffn",
        "feed_forward",
        "feedforward",
        "ff",
        "fc",
        "dense",
    ],
    &["attn", "attention", "self_attn", "self_attention", "sa"],
    &[
        "embed",
        "embedding",
        "embeddings",
        "embed_tokens",
        "tok_embeddings",
        "wte",
        "token_embedding",
    ],
    &["lm_head", "output", "head", "classifier"],
    &["norm", "layernorm", "layer_norm", "ln", "rms_norm"],
    &["layers", "layer", "blocks", "block", "h"],
];

/// Levenshtein distance between `a` and `b` (by chars).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != cb))
                .min(above + 1)
                .min(row[j] + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Whether `a` and `b` are names of the same part in some model family.
fn synonyms(a: &str, b: &str) -> bool {
    SYNONYMS
        .iter()
        .any(|group| group.contains(&a) && group.contains(&b))
}

/// How close `candidate` is to `wanted`, lower is closer; `None` when it is not worth naming.
fn score(wanted: &str, candidate: &str) -> Option<usize> {
    let wanted_segments: Vec<&str> = wanted.split('.').collect();
    let candidate_segments: Vec<&str> = candidate.split('.').collect();
    let same_parts = wanted_segments.len() == candidate_segments.len()
        && wanted_segments
            .iter()
            .zip(&candidate_segments)
            .all(|(w, c)| w == c || synonyms(w, c));
    if same_parts {
        return Some(0);
    }
    let d = distance(wanted, candidate);
    let close = d <= (wanted.chars().count() / 3).max(2);
    let contains = wanted.len() >= 3 && (candidate.contains(wanted) || wanted.contains(candidate));
    (close || contains).then_some(d + 1)
}

/// The best `MAX_SUGGESTIONS` of `candidates` for `wanted`, closest first.
fn best(wanted: &str, candidates: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut scored: Vec<(usize, String)> = candidates
        .into_iter()
        .filter_map(|c| score(wanted, &c).map(|s| (s, c)))
        .collect();
    scored.sort();
    scored
        .into_iter()
        .map(|(_, c)| c)
        .take(MAX_SUGGESTIONS)
        .collect()
}

/// The runs of as many consecutive dotted segments as `filter` has, over every path, that are
/// closest to `filter` (runs that are all digits, layer indices, are left out).
pub(crate) fn segments(filter: &str, paths: &[&str]) -> Vec<String> {
    let n = filter.split('.').count();
    let mut runs = BTreeSet::new();
    for path in paths {
        let segments: Vec<&str> = path.split('.').collect();
        for run in segments.windows(n) {
            if !run.iter().all(|s| s.chars().all(|c| c.is_ascii_digit())) {
                runs.insert(run.join("."));
            }
        }
    }
    best(filter, runs)
}

/// The full paths closest to `path`.
pub(crate) fn paths(path: &str, paths: &[&str]) -> Vec<String> {
    best(path, paths.iter().map(|p| p.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &[&str] = &[
        "tok_embeddings.weight",
        "layers.0.attention.wq.weight",
        "layers.0.feed_forward.w1.weight",
        "layers.0.ffn_norm.gamma",
        "norm.gamma",
        "output.weight",
    ];

    #[test]
    fn a_family_name_suggests_this_model_s_name() {
        assert_eq!(segments("mlp", LLAMA), ["feed_forward"]);
        assert_eq!(segments("self_attn", LLAMA), ["attention"]);
        assert_eq!(segments("lm_head", LLAMA), ["output"]);
    }

    #[test]
    fn a_typo_suggests_the_nearest_spelling() {
        assert_eq!(segments("feed_froward", LLAMA)[0], "feed_forward");
        assert_eq!(segments("attention.wk", LLAMA)[0], "attention.wq");
        assert_eq!(
            paths("layers.0.attention.wq.weigth", LLAMA),
            ["layers.0.attention.wq.weight"]
        );
        assert!(segments("zzzzzz", LLAMA).is_empty());
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
