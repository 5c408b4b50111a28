"""Answer for a function that a loaded shared library calls through its PLT (x86-64 Linux).

A shared library calls the functions it exports to itself through its
procedure linkage table: each call jumps to the address held in the
function's slot of the global offset table, a slot the dynamic linker fills.
Writing another address into that slot redirects every later call from that
library, which is what ``LD_PRELOAD`` does at load time, here done from
Python after the load. :mod:`stages.core.kernels` uses it to give MKL's
vendor checks, compiled into ``libtorch_cpu.so``, one answer on every CPU.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

SHT_RELA = 4
R_X86_64_JUMP_SLOT = 7
RELA_SIZE = 24  # Elf64_Rela: r_offset, r_info, r_addend
SYM_SIZE = 24  # Elf64_Sym, st_name first

_code_pages: list[mmap.mmap] = []  # the constant functions' code, kept mapped for the life of the process


def jump_slot_offsets(library: Path, names: set[str]) -> dict[str, int]:
    """The global-offset-table slot of each named function the 64-bit ELF ``library`` calls through its PLT,
    as an offset from the library's load address; names it does not call that way are left out."""
    with open(library, "rb") as file:
        def read(offset: int, size: int) -> bytes:
            file.seek(offset)
            return file.read(size)

        header = read(0, 64)
        section_table, = struct.unpack_from("<Q", header, 0x28)
        entry_size, count = struct.unpack_from("<HH", header, 0x3A)
        # Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize
        sections = [struct.unpack("<IIQQQQIIQQ", read(section_table + i * entry_size, entry_size))
                    for i in range(count)]

        def contents(section: tuple) -> bytes:
            return read(section[4], section[5])

        slots = {}
        for section in sections:
            if section[1] != SHT_RELA:
                continue
            symbols = sections[section[6]]
            symbol_table, names_table = contents(symbols), contents(sections[symbols[6]])
            relocations = contents(section)
            for at in range(0, len(relocations), RELA_SIZE):
                slot, info, _ = struct.unpack_from("<QQq", relocations, at)
                if info & 0xFFFFFFFF != R_X86_64_JUMP_SLOT:
                    continue
                name_at, = struct.unpack_from("<I", symbol_table, (info >> 32) * SYM_SIZE)
                name = names_table[name_at:names_table.index(b"\0", name_at)].decode()
                if name in names:
                    slots[name] = slot
        return slots


def load_address(library: Path) -> int:
    """Where this process mapped ``library``'s first byte (it must be loaded)."""
    wanted = os.path.realpath(library)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and int(fields[2], 16) == 0 and os.path.realpath(fields[5].strip()) == wanted:
                return int(fields[0].split("-")[0], 16)
    raise LookupError(f"{library} is not loaded in this process")


def constant_function(value: int) -> int:
    """The address of a new function ``int f(void)`` that returns ``value``: ``mov eax, value; ret``."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(b"\xb8" + struct.pack("<i", value) + b"\xc3")
    _code_pages.append(page)
    return ctypes.addressof(ctypes.c_char.from_buffer(page))


def call_slot(slot: int) -> int:
    """Call the ``int f(void)`` whose address the slot at ``slot`` holds, as the library would."""
    return ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.c_void_p.from_address(slot).value)()


def redirect(slot: int, function: int) -> None:
    """Make the slot at address ``slot`` hold ``function``. Its page is made writable first: a library linked
    with full RELRO has its slots made read-only after loading, and they stay writable after this."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = slot - slot % mmap.PAGESIZE
    if libc.mprotect(page, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed on a global offset table page")
    ctypes.c_void_p.from_address(slot).value = function
