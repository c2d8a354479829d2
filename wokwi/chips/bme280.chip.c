// Wokwi custom chip: Bosch BME280 on I2C (address 0x76), register-compatible with the real part.
// Chip id 0xD0 = 0x60, soft reset 0xE0 = 0xB6 (status.im_update while the NVM is copied), calibration NVM
// (0x88..0xA1, 0xE1..0xE7, same production values as firmware/host/bme280_emu.py), ctrl_hum latched by
// the ctrl_meas write, config (IIR, standby), forced and normal mode with status.measuring, skipped
// channels (0x80000 / 0x8000). Raw ADC values are computed by inverting the datasheet's floating-point
// compensation (bisection), so the driver reads back the temperature/humidity/pressure controls.
// Writes are (register, value) pairs, reads auto-increment, as on the real chip.
#include "wokwi-api.h"
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  uint16_t T1; int16_t T2, T3;
  uint16_t P1; int16_t P2, P3, P4, P5, P6, P7, P8, P9;
  uint8_t H1; int16_t H2; uint8_t H3; int16_t H4, H5; int8_t H6;
} calib_t;

static const calib_t CAL = {28485, 26735, 50, 36738, -10635, 3024, 6980, -4, -7, 9900, -10230, 4285,
                            75, 362, 0, 313, 50, 30};
static const uint8_t OS_N[8] = {0, 1, 2, 4, 8, 16, 16, 16};
static const uint8_t IIR_C[8] = {1, 2, 4, 8, 16, 16, 16, 16};
static const uint32_t TSB_US[8] = {500, 62500, 125000, 250000, 500000, 1000000, 10000, 20000};

typedef struct {
  uint8_t regs[256];
  uint8_t ptr;
  bool have_reg;     // write phase: next byte is a value for `ptr`
  uint8_t osr_h_latched;
  bool measuring;
  uint64_t meas_end_ns, nvm_end_ns;
  double filt_t, filt_p;
  bool filt_valid;
  uint32_t attr_t, attr_h, attr_p;
} chip_t;

// ---- datasheet floating-point compensation (section 8.1)
double bme_comp_t(double adc_t, double *t_fine) {
  double v1 = (adc_t / 16384.0 - CAL.T1 / 1024.0) * CAL.T2;
  double v2 = (adc_t / 131072.0 - CAL.T1 / 8192.0);
  v2 = v2 * v2 * CAL.T3;
  *t_fine = v1 + v2;
  return *t_fine / 5120.0;
}

double bme_comp_p(double adc_p, double t_fine) {
  double v1 = t_fine / 2.0 - 64000.0;
  double v2 = v1 * v1 * CAL.P6 / 32768.0;
  v2 = v2 + v1 * CAL.P5 * 2.0;
  v2 = v2 / 4.0 + CAL.P4 * 65536.0;
  v1 = (CAL.P3 * v1 * v1 / 524288.0 + CAL.P2 * v1) / 524288.0;
  v1 = (1.0 + v1 / 32768.0) * CAL.P1;
  if (v1 == 0) return 0;
  double p = 1048576.0 - adc_p;
  p = (p - v2 / 4096.0) * 6250.0 / v1;
  v1 = CAL.P9 * p * p / 2147483648.0;
  v2 = p * CAL.P8 / 32768.0;
  return (p + (v1 + v2 + CAL.P7) / 16.0) / 100.0;
}

double bme_comp_h(double adc_h, double t_fine) {
  double h = t_fine - 76800.0;
  h = (adc_h - (CAL.H4 * 64.0 + CAL.H5 / 16384.0 * h)) *
      (CAL.H2 / 65536.0 * (1.0 + CAL.H6 / 67108864.0 * h * (1.0 + CAL.H3 / 67108864.0 * h)));
  h = h * (1.0 - CAL.H1 * h / 524288.0);
  return h < 0 ? 0 : (h > 100 ? 100 : h);
}

// ---- inversion: environment -> raw ADC values
void bme_invert(double t, double h, double p, uint32_t *adc_t, uint32_t *adc_p, uint32_t *adc_h) {
  double tf;
  uint32_t lo = 0, hi = 0xFFFFF;
  while (hi - lo > 1) {  // temperature increases with adc_T
    uint32_t mid = (lo + hi) / 2;
    if (bme_comp_t(mid, &tf) < t) lo = mid; else hi = mid;
  }
  double tl = bme_comp_t(lo, &tf), th = bme_comp_t(hi, &tf);
  *adc_t = (t - tl <= th - t) ? lo : hi;
  bme_comp_t(*adc_t, &tf);
  lo = 0; hi = 0xFFFFF;
  while (hi - lo > 1) {  // pressure decreases with adc_P
    uint32_t mid = (lo + hi) / 2;
    if (bme_comp_p(mid, tf) > p) lo = mid; else hi = mid;
  }
  *adc_p = (bme_comp_p(lo, tf) - p <= p - bme_comp_p(hi, tf)) ? lo : hi;
  lo = 0; hi = 0xFFFF;
  while (hi - lo > 1) {  // humidity increases with adc_H
    uint32_t mid = (lo + hi) / 2;
    if (bme_comp_h(mid, tf) < h) lo = mid; else hi = mid;
  }
  *adc_h = (h - bme_comp_h(lo, tf) <= bme_comp_h(hi, tf) - h) ? lo : hi;
}

static void put16(uint8_t *r, int16_t v) { r[0] = (uint16_t)v & 0xFF; r[1] = (uint16_t)v >> 8; }

static void power_on(chip_t *c) {
  memset(c->regs, 0, sizeof c->regs);
  c->regs[0xD0] = 0x60;
  uint8_t *r = &c->regs[0x88];
  int16_t vals[12] = {(int16_t)CAL.T1, CAL.T2, CAL.T3, (int16_t)CAL.P1, CAL.P2, CAL.P3, CAL.P4, CAL.P5,
                      CAL.P6, CAL.P7, CAL.P8, CAL.P9};
  for (int i = 0; i < 12; i++) put16(r + 2 * i, vals[i]);
  c->regs[0xA1] = CAL.H1;
  put16(&c->regs[0xE1], CAL.H2);
  c->regs[0xE3] = CAL.H3;
  uint16_t h4 = (uint16_t)CAL.H4 & 0xFFF, h5 = (uint16_t)CAL.H5 & 0xFFF;
  c->regs[0xE4] = h4 >> 4;
  c->regs[0xE5] = (h4 & 0x0F) | ((h5 & 0x0F) << 4);
  c->regs[0xE6] = h5 >> 4;
  c->regs[0xE7] = (uint8_t)CAL.H6;
  static const uint8_t data_reset[8] = {0x80, 0, 0, 0x80, 0, 0, 0x80, 0};
  memcpy(&c->regs[0xF7], data_reset, 8);
  c->osr_h_latched = 0;
  c->measuring = false;
  c->filt_valid = false;
  c->nvm_end_ns = get_sim_nanos() + 2000000;
}

static uint64_t t_meas_ns(chip_t *c) {
  uint8_t ctrl = c->regs[0xF4];
  uint32_t nt = OS_N[ctrl >> 5], np = OS_N[(ctrl >> 2) & 7], nh = OS_N[c->osr_h_latched];
  double ms = 1.0 + 2.0 * nt + (np ? 2.0 * np + 0.5 : 0) + (nh ? 2.0 * nh + 0.5 : 0);
  return (uint64_t)(ms * 1e6);
}

static void measure(chip_t *c) {
  uint32_t at, ap, ah;
  bme_invert(attr_read_float(c->attr_t), attr_read_float(c->attr_h), attr_read_float(c->attr_p), &at, &ap, &ah);
  uint8_t ctrl = c->regs[0xF4];
  double coef = IIR_C[(c->regs[0xF5] >> 2) & 7];
  if (!c->filt_valid || coef == 1) {
    c->filt_t = at; c->filt_p = ap; c->filt_valid = true;
  } else {
    c->filt_t = (c->filt_t * (coef - 1) + at) / coef;
    c->filt_p = (c->filt_p * (coef - 1) + ap) / coef;
  }
  uint32_t ft = (uint32_t)(c->filt_t + 0.5), fp = (uint32_t)(c->filt_p + 0.5);
  if (!(ctrl >> 5)) ft = 0x80000;
  if (!((ctrl >> 2) & 7)) fp = 0x80000;
  if (!c->osr_h_latched) ah = 0x8000;
  uint8_t *r = &c->regs[0xF7];
  r[0] = fp >> 12; r[1] = (fp >> 4) & 0xFF; r[2] = (fp & 0xF) << 4;
  r[3] = ft >> 12; r[4] = (ft >> 4) & 0xFF; r[5] = (ft & 0xF) << 4;
  r[6] = ah >> 8; r[7] = ah & 0xFF;
}

static void tick(chip_t *c) {
  uint64_t now = get_sim_nanos();
  if (!c->measuring || now < c->meas_end_ns) return;
  measure(c);
  if ((c->regs[0xF4] & 3) == 3) {  // normal mode: standby, then the next conversion
    uint64_t start = c->meas_end_ns + (uint64_t)TSB_US[c->regs[0xF5] >> 5] * 1000;
    if (start < now) start = now;
    c->meas_end_ns = start + t_meas_ns(c);
  } else {  // forced mode: back to sleep
    c->regs[0xF4] &= 0xFC;
    c->measuring = false;
  }
}

uint8_t bme_read_reg(chip_t *c, uint8_t a) {
  tick(c);
  if (a == 0xF3) {
    uint8_t s = 0;
    if (c->measuring) s |= 0x08;
    if (get_sim_nanos() < c->nvm_end_ns) s |= 0x01;
    return s;
  }
  return c->regs[a];
}

void bme_write_reg(chip_t *c, uint8_t a, uint8_t v) {
  tick(c);
  switch (a) {
    case 0xE0: if (v == 0xB6) power_on(c); break;
    case 0xF2: c->regs[0xF2] = v & 0x07; break;
    case 0xF5: c->regs[0xF5] = v & 0xFD; break;
    case 0xF4:
      c->regs[0xF4] = v;
      c->osr_h_latched = c->regs[0xF2] & 7;  // ctrl_hum takes effect on the ctrl_meas write
      if (v & 3) {
        c->measuring = true;
        c->meas_end_ns = get_sim_nanos() + t_meas_ns(c);
      } else {
        c->measuring = false;
      }
      break;
    default: break;  // read-only
  }
}

// ---- I2C callbacks
static bool on_connect(void *user_data, uint32_t address, bool read) {
  chip_t *c = user_data;
  if (!read) c->have_reg = false;
  return true;  // ACK
}

static uint8_t on_read(void *user_data) {
  chip_t *c = user_data;
  return bme_read_reg(c, c->ptr++);
}

static bool on_write(void *user_data, uint8_t data) {
  chip_t *c = user_data;
  if (!c->have_reg) {
    c->ptr = data;
    c->have_reg = true;
  } else {  // (register, value) pairs: no auto-increment for writes
    bme_write_reg(c, c->ptr, data);
    c->have_reg = false;
  }
  return true;
}

static void on_disconnect(void *user_data) {}

chip_t *bme_new(void) {
  chip_t *c = calloc(1, sizeof(chip_t));
  c->attr_t = attr_init_float("temperature", 21.5);
  c->attr_h = attr_init_float("humidity", 45.0);
  c->attr_p = attr_init_float("pressure", 1013.25);
  power_on(c);
  return c;
}

void chip_init(void) {
  chip_t *c = bme_new();
  const i2c_config_t i2c = {
    .user_data = c,
    .address = 0x76,
    .scl = pin_init("SCL", INPUT),
    .sda = pin_init("SDA", INPUT),
    .connect = on_connect,
    .read = on_read,
    .write = on_write,
    .disconnect = on_disconnect,
  };
  i2c_init(&i2c);
  pin_init("VCC", INPUT);
  pin_init("GND", INPUT);
}
