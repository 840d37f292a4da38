use recipe_erasing_plugin as _; // keep the plugin's registration in the binary
fn main() -> std::process::ExitCode {
    recipe::cli::main()
}
