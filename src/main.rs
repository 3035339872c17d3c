fn main() -> std::process::ExitCode {
    lbw::cli::main()
}
