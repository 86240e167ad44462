// libzstd from Debian's libzstd-dev (installed by scripts/setup.sh).
#include <zstd.h>
