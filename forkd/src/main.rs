fn main() -> std::process::ExitCode {
    forkd::cli::main()
}
