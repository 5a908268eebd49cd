//! The waypoint (L7 proxy) is not built yet; see README "Status".
mod controller;

fn main() -> std::process::ExitCode {
    if let Some(code) = controller::main_for_subcommand() {
        return code;
    }
    eprintln!("waypoint: not implemented yet; the L7 waypoint comes after HBONE (see README, Status)");
    std::process::ExitCode::from(2)
}
