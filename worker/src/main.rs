fn main() -> anyhow::Result<()> {
    pawfect_worker::cli::main()
}
