//! The shipping service as a process: its environment and modes are `sagaflow_workers::service`'s.
fn main() -> std::process::ExitCode {
    sagaflow_workers::service::main(sagaflow_example_shipping::SERVICE)
}
