//! `pawfect-worker`: the GPU worker binary.

fn main() -> anyhow::Result<()> {
    pawfect_worker::cli::main()
}
