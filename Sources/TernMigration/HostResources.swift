import Foundation

/// What this host can give a VM that arrives: the default limits of a destination started without
/// `--memory`/`--cpus`.
enum HostResources {
    /// MemAvailable from /proc/meminfo (memory the kernel can hand out without swapping), in bytes.
    static func availableMemory(meminfo: String? = try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) -> UInt64? {
        guard let meminfo else { return nil }
        for line in meminfo.split(separator: "\n") where line.hasPrefix("MemAvailable:") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard fields.count >= 2, let kilobytes = UInt64(fields[1]) else { return nil }
            return kilobytes * 1024
        }
        return nil
    }

    static var processors: Int { ProcessInfo.processInfo.activeProcessorCount }
}
