//! Requests from a Mooncake-format trace, the batch chosen from them, and
//! their lengths scaled down to what the preset can compute.
//!
//! A trace is JSON Lines, one request per line:
//! `{"timestamp": ms, "input_length": tokens, "output_length": tokens,
//! "hash_ids": [..]}`. `hash_ids` holds one id per 512-token block of the
//! prompt, the last block possibly partial, so its length is
//! `ceil(input_length / 512)`. Equal id chains mean equal prompt prefixes.

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::prefix::shared_prefix_depths;

/// Tokens covered by one hash id in the published trace.
pub const HASH_BLOCK_TOKENS: u64 = 512;

/// One request as the trace records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Line in the trace file, from 1.
    pub line: usize,
    pub timestamp: u64,
    pub input_length: u64,
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

/// A trace that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace {}: {source}; pass an existing JSON Lines file with --trace", path.display())]
    Read { path: PathBuf, source: std::io::Error },

    #[error("{}:{line}: {reason}", path.display())]
    Line { path: PathBuf, line: usize, reason: String },

    #[error("{}:{line}: field `{field}`: {reason}", path.display())]
    Field { path: PathBuf, line: usize, field: &'static str, reason: String },

    #[error("trace {} holds no requests", path.display())]
    Empty { path: PathBuf },

    #[error("--batch {batch} exceeds the {available} requests in {}; pass a smaller --batch or a larger --trace", path.display())]
    BatchTooLarge { path: PathBuf, batch: usize, available: usize },
}

/// Reads every request of the trace at `path`. Blank lines are skipped.
pub fn load(path: &Path) -> Result<Vec<Request>, TraceError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| TraceError::Read { path: path.to_path_buf(), source })?;
    parse(path, &text)
}

/// Parses trace text; `path` only names the source in errors.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Request>, TraceError> {
    let mut requests = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        requests.push(parse_line(path, index + 1, line)?);
    }
    if requests.is_empty() {
        return Err(TraceError::Empty { path: path.to_path_buf() });
    }
    Ok(requests)
}

fn parse_line(path: &Path, line: usize, text: &str) -> Result<Request, TraceError> {
    let line_error = |reason: String| TraceError::Line { path: path.to_path_buf(), line, reason };
    let field_error = |field: &'static str, reason: String| TraceError::Field {
        path: path.to_path_buf(),
        line,
        field,
        reason,
    };

    let value: Value =
        serde_json::from_str(text).map_err(|e| line_error(format!("invalid JSON: {e}")))?;
    let Value::Object(object) = value else {
        return Err(line_error(format!("expected a JSON object, found {}", kind(&value))));
    };

    let number = |field: &'static str| -> Result<u64, TraceError> {
        unsigned(&object, field).map_err(|reason| field_error(field, reason))
    };
    let timestamp = number("timestamp")?;
    let input_length = number("input_length")?;
    let output_length = number("output_length")?;
    if input_length == 0 {
        return Err(field_error("input_length", "is 0; a request needs at least one token".into()));
    }

    let hash_ids = match object.get("hash_ids") {
        None => return Err(field_error("hash_ids", "missing".into())),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_u64().ok_or_else(|| {
                    field_error("hash_ids", format!("element {i} is {item}, expected an unsigned integer"))
                })
            })
            .collect::<Result<Vec<u64>, _>>()?,
        Some(other) => {
            return Err(field_error("hash_ids", format!("expected an array, found {}", kind(other))))
        }
    };
    let expected = input_length.div_ceil(HASH_BLOCK_TOKENS);
    if hash_ids.len() as u64 != expected {
        return Err(field_error(
            "hash_ids",
            format!(
                "has {} ids, but input_length {input_length} needs {expected} ids of {HASH_BLOCK_TOKENS} tokens",
                hash_ids.len()
            ),
        ));
    }

    Ok(Request { line, timestamp, input_length, output_length, hash_ids })
}

fn unsigned(object: &Map<String, Value>, field: &str) -> Result<u64, String> {
    match object.get(field) {
        None => Err("missing".into()),
        Some(value) => value
            .as_u64()
            .ok_or_else(|| format!("is {value}, expected an unsigned integer")),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Chooses `batch` requests, those sharing the longest prompt prefix with
/// another request of the trace first, ties in trace order, and returns
/// them in trace order. This puts requests that share KV blocks into the
/// same batch, which is what prefix sharing needs to show an effect.
pub fn select_batch(
    path: &Path,
    requests: &[Request],
    batch: usize,
) -> Result<Vec<Request>, TraceError> {
    if batch > requests.len() {
        return Err(TraceError::BatchTooLarge {
            path: path.to_path_buf(),
            batch,
            available: requests.len(),
        });
    }
    let chains: Vec<&[u64]> = requests.iter().map(|r| r.hash_ids.as_slice()).collect();
    let depths = shared_prefix_depths(&chains);

    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(depths[i]), i));
    order.truncate(batch);
    order.sort_unstable();
    Ok(order.into_iter().map(|i| requests[i].clone()).collect())
}

/// The factor by which trace lengths are divided: a power of two from 1 to
/// 512, so one hash block becomes a whole number of tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scale(u32);

impl Scale {
    /// Returns the scale, or an error naming `factor` if it is not a power
    /// of two from 1 to 512.
    pub fn new(factor: u32) -> Result<Self, String> {
        if factor.is_power_of_two() && u64::from(factor) <= HASH_BLOCK_TOKENS {
            Ok(Scale(factor))
        } else {
            Err(format!(
                "scale {factor} is not a power of two from 1 to {HASH_BLOCK_TOKENS}; \
                 a 512-token block must become a whole number of tokens"
            ))
        }
    }

    /// Tokens of one scaled hash block, `512 / factor`.
    pub fn hash_block_tokens(self) -> usize {
        (HASH_BLOCK_TOKENS / u64::from(self.0)) as usize
    }

    /// Returns `tokens / factor`, rounded up so no request becomes empty.
    /// `ceil(ceil(n / s) / (512 / s)) = ceil(n / 512)`, so the scaled
    /// prompt still needs exactly its `hash_ids`.
    pub fn apply(self, tokens: u64) -> usize {
        tokens.div_ceil(u64::from(self.0)) as usize
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One request of the batch at the computed scale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sequence {
    /// Line of the request in the trace, from 1.
    pub line: usize,
    pub prompt_tokens: usize,
    /// Scaled `output_length`, reported only: every sequence runs the same
    /// number of decode steps.
    pub output_tokens: usize,
    pub hash_ids: Vec<u64>,
}

impl Sequence {
    pub fn scaled(request: &Request, scale: Scale) -> Self {
        Sequence {
            line: request.line,
            prompt_tokens: scale.apply(request.input_length),
            output_tokens: scale.apply(request.output_length),
            hash_ids: request.hash_ids.clone(),
        }
    }

    /// Returns the hash id and the offset inside its block of prompt token
    /// `position`, with `block_tokens` tokens per hash block.
    pub fn token_source(&self, position: usize, block_tokens: usize) -> (u64, usize) {
        (self.hash_ids[position / block_tokens], position % block_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path() -> &'static Path {
        Path::new("t.jsonl")
    }

    #[test]
    fn parse_valid_lines() {
        let text = "{\"timestamp\": 0, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [1, 2]}\n\n\
                    {\"timestamp\": 3, \"input_length\": 1, \"output_length\": 0, \"hash_ids\": [9]}\n";
        let requests = parse(path(), text).unwrap();
        assert_eq!(requests.len(), 2);
        assert_eq!(requests[0].hash_ids, vec![1, 2]);
        assert_eq!(requests[1].line, 3);
    }

    #[test]
    fn parse_names_line_and_field() {
        let text = "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [1]}\n\
                    {\"timestamp\": 0, \"input_length\": \"ten\", \"output_length\": 5, \"hash_ids\": [1]}\n";
        let message = parse(path(), text).unwrap_err().to_string();
        assert!(message.starts_with("t.jsonl:2: field `input_length`"), "{message}");
        assert!(message.contains("\"ten\""), "{message}");
    }

    #[test]
    fn parse_rejects_missing_field() {
        let text = "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 5}";
        let message = parse(path(), text).unwrap_err().to_string();
        assert_eq!(message, "t.jsonl:1: field `hash_ids`: missing");
    }

    #[test]
    fn parse_rejects_bad_json() {
        let message = parse(path(), "{\"timestamp\": ").unwrap_err().to_string();
        assert!(message.starts_with("t.jsonl:1: invalid JSON"), "{message}");
    }

    #[test]
    fn parse_rejects_wrong_id_count() {
        let text = "{\"timestamp\": 0, \"input_length\": 1025, \"output_length\": 5, \"hash_ids\": [1, 2]}";
        let message = parse(path(), text).unwrap_err().to_string();
        assert!(message.contains("needs 3 ids"), "{message}");
    }

    #[test]
    fn parse_rejects_negative_id() {
        let text = "{\"timestamp\": 0, \"input_length\": 10, \"output_length\": 5, \"hash_ids\": [-1]}";
        let message = parse(path(), text).unwrap_err().to_string();
        assert!(message.contains("element 0 is -1"), "{message}");
    }

    #[test]
    fn parse_rejects_empty_trace() {
        assert!(matches!(parse(path(), "\n\n"), Err(TraceError::Empty { .. })));
    }

    fn request(line: usize, hash_ids: &[u64]) -> Request {
        Request {
            line,
            timestamp: 0,
            input_length: hash_ids.len() as u64 * HASH_BLOCK_TOKENS,
            output_length: 1,
            hash_ids: hash_ids.to_vec(),
        }
    }

    #[test]
    fn batch_prefers_shared_prefixes() {
        let requests = [
            request(1, &[0, 1]),
            request(2, &[0, 5, 6]),
            request(3, &[0, 7]),
            request(4, &[0, 5, 6, 8]),
        ];
        let batch = select_batch(path(), &requests, 2).unwrap();
        let lines: Vec<usize> = batch.iter().map(|r| r.line).collect();
        assert_eq!(lines, vec![2, 4]);
    }

    #[test]
    fn batch_too_large_is_rejected() {
        let requests = [request(1, &[0])];
        let message = select_batch(path(), &requests, 2).unwrap_err().to_string();
        assert!(message.contains("--batch 2 exceeds the 1 requests"), "{message}");
    }

    #[test]
    fn scale_accepts_powers_of_two() {
        assert_eq!(Scale::new(32).unwrap().hash_block_tokens(), 16);
        assert_eq!(Scale::new(1).unwrap().hash_block_tokens(), 512);
        assert!(Scale::new(0).is_err());
        assert!(Scale::new(3).is_err());
        assert!(Scale::new(1024).is_err());
    }

    #[test]
    fn scaling_keeps_hash_block_count() {
        for factor in [1, 2, 32, 512] {
            let scale = Scale::new(factor).unwrap();
            for input in [1u64, 511, 512, 513, 6758, 120_633] {
                let tokens = scale.apply(input);
                let blocks = tokens.div_ceil(scale.hash_block_tokens()) as u64;
                assert_eq!(blocks, input.div_ceil(HASH_BLOCK_TOKENS), "scale {factor}, input {input}");
            }
        }
    }

    #[test]
    fn token_source_maps_blocks() {
        let seq = Sequence { line: 1, prompt_tokens: 40, output_tokens: 1, hash_ids: vec![7, 8, 9] };
        assert_eq!(seq.token_source(0, 16), (7, 0));
        assert_eq!(seq.token_source(17, 16), (8, 1));
        assert_eq!(seq.token_source(39, 16), (9, 7));
    }
}
