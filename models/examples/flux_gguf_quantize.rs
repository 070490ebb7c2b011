//! Re-quantizes selected tensors of a GGUF file with candle's quantizer.
//!
//! `flux_gguf_quantize IN.gguf OUT.gguf TYPE NAMES.txt` copies every tensor of `IN.gguf` and its
//! metadata to `OUT.gguf`, quantizing the tensors listed in `NAMES.txt` (one name a line) to `TYPE`
//! (q4_0, q4_1, q5_0, q5_1, q8_0, q2k, q3k, q4k, q5k, q6k). A line `NAME TYPE` quantizes that
//! tensor to its own type instead. The fixture generators (`tools/fixtures_flux.py`,
//! `tools/fixtures_gguf.py`) use it for K-quants, which gguf-py can read but not write.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};

use anyhow::{Context, Result, bail};
use candle_core::Device;
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};

fn parse_type(s: &str) -> Result<GgmlDType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q8_0" => GgmlDType::Q8_0,
        "q2k" | "q2_k" => GgmlDType::Q2K,
        "q3k" | "q3_k" => GgmlDType::Q3K,
        "q4k" | "q4_k" => GgmlDType::Q4K,
        "q5k" | "q5_k" => GgmlDType::Q5K,
        "q6k" | "q6_k" => GgmlDType::Q6K,
        other => bail!("unknown quantization type {other}"),
    })
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output, qtype, names_file] = args.as_slice() else {
        bail!("usage: flux_gguf_quantize IN.gguf OUT.gguf TYPE NAMES.txt");
    };
    let qtype = parse_type(qtype)?;
    let mut names: HashMap<String, GgmlDType> = HashMap::new();
    for line in std::fs::read_to_string(names_file)
        .with_context(|| format!("reading {names_file}"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let (name, ty) = match line.split_once(char::is_whitespace) {
            Some((n, t)) => (n, parse_type(t.trim())?),
            None => (line, qtype),
        };
        names.insert(name.to_string(), ty);
    }
    let mut reader = BufReader::new(File::open(input).with_context(|| format!("opening {input}"))?);
    let content =
        gguf_file::Content::read(&mut reader).with_context(|| format!("reading {input}"))?;
    for n in names.keys() {
        if !content.tensor_infos.contains_key(n) {
            bail!("{input} has no tensor {n}");
        }
    }
    let mut tensor_names: Vec<&String> = content.tensor_infos.keys().collect();
    tensor_names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(tensor_names.len());
    for name in tensor_names {
        let t = content.tensor(&mut reader, name, &Device::Cpu)?;
        let t = if let Some(&ty) = names.get(name) {
            QTensor::quantize(&t.dequantize(&Device::Cpu)?, ty)
                .with_context(|| format!("quantizing {name}"))?
        } else {
            t
        };
        tensors.push((name.clone(), t));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut w = BufWriter::new(File::create(output).with_context(|| format!("creating {output}"))?);
    gguf_file::write(&mut w, &metadata, &tensor_refs)?;
    Ok(())
}
