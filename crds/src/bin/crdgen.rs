//! Prints the InpaintJob and InpaintPool CRDs, or writes them into a directory.
//!
//! `crdgen` prints both as one multi-document YAML stream; `crdgen --out-dir crds` writes
//! `crds/inpaintjobs.inpaint.pawfect.dev.yaml` and `crds/inpaintpools.inpaint.pawfect.dev.yaml`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out_dir = match args.as_slice() {
        [] => None,
        [flag, dir] if flag == "--out-dir" => Some(PathBuf::from(dir)),
        _ => {
            eprintln!("usage: crdgen [--out-dir DIR]");
            return ExitCode::from(2);
        }
    };
    let docs = match pawfect_api::crd_documents() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match out_dir {
        None => {
            let stream: Vec<&str> = docs.iter().map(|(_, y)| y.as_str()).collect();
            print!("{}", stream.join("---\n"));
        }
        Some(dir) => {
            for (name, yaml) in &docs {
                let path = dir.join(name);
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("crdgen: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("wrote {}", path.display());
            }
        }
    }
    ExitCode::SUCCESS
}
