//! The waypoint (L7 proxy) is not built yet; see README "Status".
fn main() -> std::process::ExitCode {
    eprintln!("waypoint: not implemented yet; the L7 waypoint comes after HBONE (see README, Status)");
    std::process::ExitCode::from(2)
}
