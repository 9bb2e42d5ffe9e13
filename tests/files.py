"""Real files the tests make: a multi-page pdf, a docx with headings and a table, code in three
languages, a long text, and hostile ones (encrypted or corrupt pdf, zip bomb, XML entity bomb,
binary with a .txt name, empty)."""

from __future__ import annotations

import io
import zipfile

PDF_PAGES = [
    "Chapter one. The harbour of Kestrel Bay was built in 1874 by the fishing cooperative.",
    "Chapter two. The lighthouse keeper, Marta Olsen, logged every storm in a green notebook.",
    "Chapter three. Annual rainfall in the valley averages 1200 millimetres, mostly in November.",
]


def pdf_bytes(pages: list[str] = PDF_PAGES, password: str | None = None) -> bytes:
    from fpdf import FPDF
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 8, text)
    data = bytes(pdf.output())
    if password is None:
        return data
    from pypdf import PdfReader, PdfWriter
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(data)))
    writer.encrypt(user_password=password, owner_password=password + "-owner")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_bytes() -> bytes:
    import docx
    document = docx.Document()
    document.add_heading("Quarterly budget", level=1)
    document.add_paragraph("The marketing team asked for more money for the spring campaign.")
    table = document.add_table(rows=3, cols=2)
    costs = [("Item", "Cost"), ("Printing", "4,300 EUR"), ("Radio ads", "12,900 EUR")]
    for row, (item, cost) in zip(table.rows, costs):
        row.cells[0].text, row.cells[1].text = item, cost
    document.add_heading("Staffing", level=1)
    document.add_paragraph("Two new engineers join the platform group in March.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


CODE = {
    "geometry.py": '''import math


def circle_area(radius: float) -> float:
    """Area of a circle."""
    return math.pi * radius ** 2


class Inventory:
    def __init__(self):
        self.items = {}

    def restock(self, name: str, count: int) -> None:
        self.items[name] = self.items.get(name, 0) + count
''',
    "server.rs": '''use std::net::TcpListener;

fn main() {
    let listener = TcpListener::bind("127.0.0.1:8080").unwrap();
    for stream in listener.incoming() {
        handle_connection(stream.unwrap());
    }
}

fn handle_connection(stream: std::net::TcpStream) {
    println!("connection from {:?}", stream.peer_addr());
}
''',
    "cart.js": '''export function totalPrice(cart) {
  return cart.reduce((sum, item) => sum + item.price * item.quantity, 0);
}

export function applyDiscount(total, percent) {
  return total * (1 - percent / 100);
}
''',
}


def long_text(paragraphs: int = 60) -> str:
    lines = []
    for n in range(paragraphs):
        lines.append(f"Paragraph {n}. The committee reviewed item {n} of the agenda and moved on.")
        if n == 41:
            lines.append("The secret ingredient of the festival soup is smoked paprika from Extremadura.")
        lines.append("")
    return "\n".join(lines)


def zip_bomb_docx() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", b"<w:document>" + b"A" * (300 * 2**20) + b"</w:document>")
    return out.getvalue()


def entity_bomb_docx() -> bytes:
    """The "billion laughs": ten levels of entities, each ten of the one below."""
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10}">' for i in range(1, 10)]
    xml = (f'<?xml version="1.0"?><!DOCTYPE lolz [{"".join(entities)}]>'
           '<w:document xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main">'
           "<w:body><w:p><w:r><w:t>&lol9;</w:t></w:r></w:p></w:body></w:document>")
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", xml)
    return out.getvalue()


def binary_bytes() -> bytes:
    return bytes(range(256)) * 64
