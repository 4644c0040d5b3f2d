//! `kiln-sandbox`: the stages of Kiln's action sandbox (the namespace
//! stage and init), in a binary much smaller than `kiln`, so that each
//! action pays less for the two executions a sandbox needs. The worker
//! uses it when it lies next to the `kiln` binary, and re-executes
//! itself otherwise.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let code = kiln_worker::sandbox::dispatch_stage(&args).unwrap_or_else(|| {
        // Not a stage: run by hand.
        let name = args.first().map(|a| a.to_string_lossy().into_owned()).unwrap_or_default();
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("{name}: runs only as a stage of the kiln worker's sandbox\n").as_bytes(),
        );
        2
    });
    std::process::exit(code);
}
