// Pins the FerretDB release the development services build (see scripts/services.sh).
module termopar.local/tools/ferretdb

go 1.24

require github.com/FerretDB/FerretDB v1.24.2
