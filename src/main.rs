// Training allocates and frees many large tensors per step; the system allocator returns them to
// the kernel and pays page faults on every reuse. mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    recipe::cli::main()
}
