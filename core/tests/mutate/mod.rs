//! Mutations of JSON input for the fuzz targets: changes to a JSON value (fields removed,
//! retyped, added, elements duplicated) and to its serialised bytes (flipped, inserted, deleted,
//! truncated, deeply nested arrays spliced in). Shared by podwire-core's fuzz targets and, through
//! `#[path]`, by the integration tests' (`tests/tests/fuzz.rs`), which fuzz the CNI plugin's
//! configuration and the agent's API requests with them.

use proptest::prelude::*;
use serde_json::{json, Value};

/// A JSON value of another kind than expected, or one that is awkward to hold; `extra` adds
/// values that are near misses for the input at hand (an address with a bad prefix, say).
pub fn odd_value(extra: Vec<Value>) -> impl Strategy<Value = Value> {
    let generic = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,20}".prop_map(Value::from),
        (1usize..100_000).prop_map(|n| Value::from("a".repeat(n))),
        Just(json!([])),
        Just(json!({})),
        Just(json!([null, 1, "x", {}])),
        Just(json!("\u{0}")),
        Just(json!("\u{202e}\u{fffd}")),
    ];
    if extra.is_empty() {
        generic.boxed()
    } else {
        prop_oneof![2 => generic, 1 => prop::sample::select(extra)].boxed()
    }
}

/// One change to a JSON value, at the position `at` picks among all of its values.
#[derive(Clone, Debug)]
pub enum Mutation {
    /// Remove a field of an object, or an element of an array.
    Remove(usize),
    /// Replace a value with another.
    Replace(usize, Value),
    /// Add a field to an object or an element to an array.
    Insert(usize, String, Value),
    /// Duplicate an element of an array.
    Duplicate(usize),
}

/// Mutations that insert fields named `keys` (or random names) and values from [`odd_value`].
pub fn mutation(
    keys: &'static [&'static str],
    extra: Vec<Value>,
) -> impl Strategy<Value = Mutation> {
    let key = prop_oneof![
        3 => prop::sample::select(keys).prop_map(str::to_owned),
        1 => ".{0,8}",
    ];
    prop_oneof![
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), odd_value(extra.clone())).prop_map(|(at, v)| Mutation::Replace(at, v)),
        (any::<usize>(), key, odd_value(extra)).prop_map(|(at, k, v)| Mutation::Insert(at, k, v)),
        any::<usize>().prop_map(Mutation::Duplicate),
    ]
}

#[derive(Clone, Debug)]
enum PathStep {
    Key(String),
    Index(usize),
}

/// Every value in `v`, depth first, as paths of object keys and array indices.
fn paths(v: &Value, here: &mut Vec<PathStep>, out: &mut Vec<Vec<PathStep>>) {
    out.push(here.clone());
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                here.push(PathStep::Key(k.clone()));
                paths(child, here, out);
                here.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                here.push(PathStep::Index(i));
                paths(child, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn at_path<'a>(v: &'a mut Value, path: &[PathStep]) -> &'a mut Value {
    path.iter().fold(v, |v, step| match step {
        PathStep::Key(k) => &mut v[k.as_str()],
        PathStep::Index(i) => &mut v[*i],
    })
}

/// Applies `m` to `v`.
pub fn apply(v: &mut Value, m: &Mutation) {
    let mut all = Vec::new();
    paths(v, &mut Vec::new(), &mut all);
    let pick = |at: usize| all[at % all.len()].clone();
    match m {
        Mutation::Replace(at, new) => *at_path(v, &pick(*at)) = new.clone(),
        Mutation::Remove(at) | Mutation::Duplicate(at) => {
            let path = pick(*at);
            let Some((last, parent)) = path.split_last() else {
                return;
            };
            match (at_path(v, parent), last, m) {
                (Value::Object(map), PathStep::Key(k), Mutation::Remove(_)) => {
                    map.remove(k);
                }
                (Value::Array(items), PathStep::Index(i), Mutation::Remove(_)) => {
                    items.remove(*i);
                }
                (Value::Array(items), PathStep::Index(i), Mutation::Duplicate(_)) => {
                    let copy = items[*i].clone();
                    items.push(copy);
                }
                _ => {}
            }
        }
        Mutation::Insert(at, key, new) => match at_path(v, &pick(*at)) {
            Value::Object(map) => {
                map.insert(key.clone(), new.clone());
            }
            Value::Array(items) => items.push(new.clone()),
            _ => {}
        },
    }
}

/// A change to the bytes of serialised input.
#[derive(Clone, Debug)]
pub enum ByteMutation {
    Flip(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
    /// Deeply nested arrays spliced in: a parser must not overflow its stack.
    Nest(usize, usize),
}

pub fn byte_mutation() -> impl Strategy<Value = ByteMutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| ByteMutation::Flip(at, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| ByteMutation::Insert(at, b)),
        any::<usize>().prop_map(ByteMutation::Delete),
        any::<usize>().prop_map(ByteMutation::Truncate),
        (any::<usize>(), 1usize..100_000).prop_map(|(at, n)| ByteMutation::Nest(at, n)),
    ]
}

/// Applies `m` to `bytes`.
pub fn apply_bytes(bytes: &mut Vec<u8>, m: &ByteMutation) {
    let len = bytes.len();
    let at = |i: usize| if len == 0 { 0 } else { i % len };
    match *m {
        ByteMutation::Flip(i, b) if len > 0 => bytes[at(i)] ^= b,
        ByteMutation::Insert(i, b) => bytes.insert(at(i), b),
        ByteMutation::Delete(i) if len > 0 => {
            bytes.remove(at(i));
        }
        ByteMutation::Truncate(i) => bytes.truncate(at(i)),
        ByteMutation::Nest(i, n) => {
            let i = at(i);
            let nested: Vec<u8> = std::iter::repeat_n(b'[', n)
                .chain(std::iter::repeat_n(b']', n))
                .collect();
            bytes.splice(i..i, nested);
        }
        _ => {}
    }
}
