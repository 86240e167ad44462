/// Chooses destinations by free memory: each VM, largest first, goes to the host with the
/// most memory left once what is already on its way there is counted. The whole plan is
/// made before anything moves, so an evacuation that cannot finish is refused untouched.
public enum Placement {
    public struct Move: Sendable, Equatable {
        public var vm: VMStatus
        public var destination: String
    }

    public enum Refusal: Error, Equatable, CustomStringConvertible {
        case unknownHost(String)
        case noDestination(vm: String, needsMib: UInt64, bestHost: String?, bestFreeMib: UInt64)
        case destinationFull(vm: String, host: String, needsMib: UInt64, freeMib: UInt64)
        case destinationUnusable(String, why: String)

        public var description: String {
            switch self {
            case .unknownHost(let host): "no host named '\(host)'"
            case .noDestination(let vm, let needs, let best, let free):
                best.map { "nowhere to put VM '\(vm)': it needs \(needs) MiB and the most any other reachable host has free is \(free) MiB (\($0))" }
                    ?? "nowhere to put VM '\(vm)': no other host is reachable and not draining"
            case .destinationFull(let vm, let host, let needs, let free):
                "host '\(host)' has \(free) MiB free and VM '\(vm)' needs \(needs) MiB"
            case .destinationUnusable(let host, let why): "host '\(host)' cannot take VMs: \(why)"
            }
        }
    }

    /// Destinations for `vms`, from the candidate hosts' free memory less `reservedMib` (memory
    /// already promised to migrations in flight, by host).
    public static func plan(_ vms: [VMStatus], candidates: [HostStatus], reservedMib: [String: UInt64]) throws(Refusal) -> [Move] {
        var free = Dictionary(uniqueKeysWithValues: candidates.map { host in
            (host.name, host.freeMib > (reservedMib[host.name] ?? 0) ? host.freeMib - (reservedMib[host.name] ?? 0) : 0)
        })
        var moves: [Move] = []
        for vm in vms.sorted(by: { ($0.spec.memoryMib, $1.name) > ($1.spec.memoryMib, $0.name) }) {
            // Most free first; ties by name, so that a plan is the same every time.
            guard let best = free.max(by: { ($0.value, $1.key) < ($1.value, $0.key) }) else {
                throw .noDestination(vm: vm.name, needsMib: vm.spec.memoryMib, bestHost: nil, bestFreeMib: 0)
            }
            guard best.value >= vm.spec.memoryMib else {
                throw .noDestination(vm: vm.name, needsMib: vm.spec.memoryMib, bestHost: best.key, bestFreeMib: best.value)
            }
            free[best.key] = best.value - vm.spec.memoryMib
            moves.append(Move(vm: vm, destination: best.key))
        }
        return moves
    }

    /// Moves that even out memory use: while some VM on the most loaded host (by the share of
    /// its capacity in use) would, moved to the least loaded, narrow the gap between them, the
    /// largest such VM moves. It stops when no move narrows it, so hosts end within about one
    /// VM of each other, and a balanced cluster is left alone.
    public static func balance(_ hosts: [HostStatus], reservedMib: [String: UInt64], maximumMoves: Int = 100) -> [Move] {
        var used = Dictionary(uniqueKeysWithValues: hosts.map { ($0.name, Double($0.committedMib + (reservedMib[$0.name] ?? 0))) })
        let capacity = Dictionary(uniqueKeysWithValues: hosts.map { ($0.name, Double(max($0.memoryCapacityMib, 1))) })
        var resident = Dictionary(uniqueKeysWithValues: hosts.map { ($0.name, $0.residentVMs) })
        var moves: [Move] = []
        func load(_ host: String) -> Double { used[host]! / capacity[host]! }
        while moves.count < maximumMoves {
            let ordered = hosts.map(\.name).sorted { (load($0), $1) < (load($1), $0) }
            guard let least = ordered.first, let most = ordered.last, least != most else { break }
            let gap = load(most) - load(least)
            let candidates = resident[most]!.filter { vm in
                let size = Double(vm.spec.memoryMib)
                let after = abs((used[most]! - size) / capacity[most]! - (used[least]! + size) / capacity[least]!)
                return used[least]! + size <= capacity[least]! && after < gap - 1e-9
            }
            guard let vm = candidates.max(by: { ($0.spec.memoryMib, $1.name) < ($1.spec.memoryMib, $0.name) }) else { break }
            used[most]! -= Double(vm.spec.memoryMib)
            used[least]! += Double(vm.spec.memoryMib)
            resident[most]!.removeAll { $0.name == vm.name }
            resident[least]!.append(vm)
            moves.append(Move(vm: vm, destination: least))
        }
        return moves
    }
}
